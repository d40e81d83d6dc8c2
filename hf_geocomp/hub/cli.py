"""``hf-geocomp export`` and ``hf-geocomp push``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GeoCompError


def export_command(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import check_repo_id, export

    if args.repo_id:
        check_repo_id(args.repo_id)
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise GeoCompError(f"output folder {args.output!r} already exists and is not empty; pass --overwrite.")
    results = None
    if args.results:
        try:
            results = json.loads(Path(args.results).read_text())
        except (OSError, ValueError) as e:
            raise GeoCompError(f"cannot read results JSON {args.results!r}: {e}") from None
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise GeoCompError(f"{args.model!r} is not a saved model folder (config.json is missing).")
    if not any(any(folder.glob(p)) for p in ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")):
        raise GeoCompError(f"{args.model!r} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
                           "export a folder written by save_pretrained.")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    except OSError as e:  # damaged or incomplete weights
        raise GeoCompError(f"cannot load the model in {args.model!r}: {str(e).splitlines()[0]}") from None
    tok = AutoTokenizer.from_pretrained(args.model) if (Path(args.model) / "tokenizer_config.json").is_file() else None
    export(model, args.output, results=results, tokenizer=tok, base_model=args.base_model, repo_id=args.repo_id,
           command=args.command_line, overwrite=args.overwrite)
    print(f"wrote {args.output} (weights, config with the geocomp plan, model card)")


def export_onnx_command(args) -> None:
    from ..data import load_config, load_model, resolve_model
    from .onnx import (REPORT, check_destination, check_tolerance, config_plan, export_onnx, kv_note, kv_refusal,
                       require_onnx)

    require_onnx()
    check_tolerance(args.tolerance)
    check_destination(args.output, args.model, args.overwrite)
    config = load_config(args.model)  # the config alone: refusals come before any weights are read
    gguf = resolve_model(args.model)[1]
    archs = " ".join(getattr(config, "architectures", None) or [])
    if not ("CausalLM" in archs or "LMHead" in archs or gguf):
        raise GeoCompError(f"export-onnx exports causal language models; {args.model!r} is {archs or 'not one'}.")
    plan = config_plan(config)
    refusal = kv_refusal(plan)
    if refusal and not args.without_kv_coding:
        raise GeoCompError(refusal)
    model, tok = load_model(args.model, task="causal-lm")
    report = export_onnx(model, args.output, tokenizer=tok, without_kv_coding=args.without_kv_coding,
                         tolerance=args.tolerance, overwrite=args.overwrite, source=args.model,
                         command=args.command_line)
    parity = report["parity"]
    print(f"wrote {args.output}: prefill.onnx (no past) and decode.onnx (with past); ONNX Runtime vs PyTorch, "
          f"max abs logit difference {parity['prefill']['max_abs_diff']:.3g} without a past, "
          f"{parity['decode']['max_abs_diff']:.3g} with one (report: {REPORT})")
    if refusal:
        print("without KV coding: " + kv_note(plan))


def push_command(args) -> None:
    from .export import push

    url = push(args.folder, args.repo_id, private=args.private, endpoint=args.endpoint)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")


def add_parsers(sub, lazy) -> None:
    e = sub.add_parser("export", help="a saved geocomp model → a Hub-ready folder with its model card (atomic)")
    e.add_argument("model", help="folder written by save_pretrained of a geocomp model")
    e.add_argument("--output", "-o", required=True, help="output folder (must not exist or be empty)")
    e.add_argument("--results", help="results JSON (baseline + rows) measured on held-out data, for the card")
    e.add_argument("--base-model", help="Hub id of the base model, for the card metadata")
    e.add_argument("--repo-id", help="Hub id the folder will be pushed to (named in the card's loading snippet)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    e.set_defaults(handler=lazy(".hub.cli:export_command"))
    o = sub.add_parser("export-onnx", help="a causal LM (pruned, folded, three-factor) → ONNX graphs without and "
                       "with a past, checked against PyTorch in ONNX Runtime (the onnx extra)")
    o.add_argument("model", help="bundled name, model folder (a geocomp model reloads compressed), .gguf or Hub id")
    o.add_argument("output", help="output folder (must not exist or be empty)")
    o.add_argument("--without-kv-coding", action="store_true", help="export a KV-coded model's weights with a plain "
                   "float KV cache (the coded cache runs only in PyTorch; without this flag such a model is refused)")
    o.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed ONNX Runtime vs PyTorch logit "
                   "difference, as a fraction of the largest |logit| (at least 1) (default: 1e-4)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    o.set_defaults(handler=lazy(".hub.cli:export_onnx_command"))
    p = sub.add_parser("push", help="upload an exported folder to the Hub (token from HF_TOKEN or `hf auth login`)")
    p.add_argument("folder", help="folder written by `hf-geocomp export`")
    p.add_argument("--repo-id", required=True, help="namespace/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(handler=lazy(".hub.cli:push_command"))
