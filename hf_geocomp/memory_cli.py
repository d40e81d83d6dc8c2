"""The ``plan-memory`` subcommand's arguments (no torch here: ``hf-geocomp --help`` lists it without loading
:mod:`hf_geocomp.memory`)."""

from __future__ import annotations

PIPELINES = ("whole", "sequential")  # the pipelines hf_geocomp.memory models


def add_parser(sub, lazy) -> None:
    """The ``plan-memory`` subcommand."""
    p = sub.add_parser("plan-memory", help="predict the peak memory of a job from the model's config alone and say "
                       "whether it fits this machine, before loading anything")
    p.add_argument("models", nargs="+", metavar="MODEL [RECIPE.yaml]",
                   help="bundled names, model folders, .gguf files or Hub ids, then optionally a job recipe")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys (as `run --set`)")
    p.add_argument("--pipeline", default="whole", choices=[*PIPELINES, "both"],
                   help="whole: every block's statistics at once (today's job); sequential: one block's at a time")
    p.add_argument("--dtype", default="float32", help="the dtype the weights are loaded in (the job loads float32)")
    p.add_argument("--output", "-o", default=None, help="also write the plans as a results JSON")
    p.add_argument("--no-check", action="store_true", help="do not exit 2 when a run is predicted not to fit")
    p.set_defaults(handler=lazy(".memory:run_plan_memory"))
