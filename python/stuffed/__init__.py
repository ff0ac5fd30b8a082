"""stuffed: stream millions of tokens through recurrent language models (Mamba-1/2, RWKV-5/6/7,
HGRN-2, GLA, RetNet, DeltaNet, Gated DeltaNet, xLSTM) in constant memory, and measure how their fixed-size state fails.

    import stuffed
    m = stuffed.Model("state-spaces/mamba2-130m")     # a directory, a file, or a name in the HF cache
    ids = m.encode("The quick brown fox")
    state = m.state()                                 # float32 zeros; yours to copy, save, restore
    logits = m.forward(ids, state)                    # (n, vocab_rows); state advanced in place
    nll = m.nll(m.encode(open("book.txt").read()))    # per-position NLL, as `ppl --nll-out`
    r = stuffed.ppl("state-spaces/mamba2-130m", text="book.txt", max_tokens=65536)

Everything runs the library the `stuffed` CLI runs (one code path); the evaluators take the CLI's
options as keyword arguments (`max_tokens=`, `forget=`, `train_len=`, …) and return what it writes.
Computation releases the GIL. A `Model` may be used from several threads at once, each with its
own state; a state is one stream.
"""
import csv
import json
import os
import tempfile

import numpy as np

from ._stuffed import Handle, run_cli

__all__ = ["Model", "ppl", "passkey", "probe", "calibrate", "effrem", "run_cli"]


def _ids(tokens):
    a = np.ascontiguousarray(tokens)
    if a.ndim != 1:
        raise ValueError("tokens: give a 1-D sequence of token ids")
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 0xFFFFFFFF):
        raise ValueError("tokens: give non-negative integer token ids")
    return a.astype(np.uint32, copy=False)


class Model:
    """A model opened as `stuffed --model PATH` opens it: a directory, a checkpoint file, or
    `owner/name[@revision]` from the local Hugging Face cache (nothing is downloaded).

    `forget` is a `--forget` string (`rri:a=0.9999,b=0.75`, `window:r=4096`, …); `chunk` the
    tokens per forward call (default 256; 1 runs the token-by-token recurrence); `state_file` an
    RWKV-5/6/7 state-tuning file beside the model (`--state-file`): every stream starts from it."""

    def __init__(self, path, forget=None, chunk=None, state_file=None):
        self._h = Handle(os.fspath(path), None if state_file is None else os.fspath(state_file))
        if forget is not None:
            self._h.set_forget(forget)
        if chunk is not None:
            self._h.set_chunk(chunk)

    @property
    def info(self):
        """`stuffed info --json`'s facts, plus `state_floats` and `real_vocab`."""
        d = json.loads(self._h.info_json())
        family, _, _, _, real, state_len, _ = self._h.facts()
        d.update(family=family, real_vocab=real, state_floats=state_len)
        return d

    def state(self):
        """The state a stream starts from (float32: zeros, or a state-tuned RWKV's own). Copy it to
        snapshot, assign to restore."""
        s = np.zeros(self._h.state_len(), dtype=np.float32)
        self._h.initial_state(s)
        return s

    def _state(self, state):
        if state is None:
            return self.state()
        if not (isinstance(state, np.ndarray) and state.dtype == np.float32 and state.flags.c_contiguous):
            raise ValueError("state: give a contiguous float32 array from Model.state()")
        return state

    def forward(self, tokens, state=None, last=False):
        """Logits `(n, vocab_rows)` of every position (`last=True`: the last position's only) after
        `tokens`, from `state` (advanced in place; default: a fresh zero state). The same numbers
        as `stuffed logits --chunk C` for calls of C tokens."""
        return self._h.forward(_ids(tokens), self._state(state), not last)

    def nll(self, tokens, chunk=512):
        """Per-position NLL of a stream from the zero state: element i is that of `tokens[i + 1]`,
        scored in calls of `chunk` tokens as `stuffed ppl --chunk` does (its `--nll-out` numbers),
        under the model's forgetting method; memory stays constant in the stream's length."""
        return self._h.nll_stream(_ids(tokens), chunk)

    def nll_of(self, tokens, targets, state=None):
        """NLL of `targets[i]` after `tokens[:i + 1]`, from `state` (advanced in place)."""
        return self._h.nll_of(_ids(tokens), _ids(targets), self._state(state))

    def generate(self, prompt, max_new=32, state=None, ids=False):
        """Greedy continuation of `prompt` (text or token ids), as `stuffed generate`: stops at
        `<|endoftext|>`. Returns the text (`ids=True`: the token ids as an array)."""
        p = self.encode(prompt) if isinstance(prompt, str) else _ids(prompt)
        out = self._h.generate(p, self._state(state), max_new, self._h.token_id("<|endoftext|>"))
        return np.array(out, dtype=np.uint32) if ids else self.decode(out)

    def encode(self, text):
        return self._h.encode(text)

    def decode(self, ids):
        return self._h.decode(_ids(ids))


def _flags(options):
    args = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False:
            continue
        if v is True:
            args.append(flag)
        elif isinstance(v, (list, tuple)):
            for x in v:
                args += [flag, os.fspath(x) if isinstance(x, os.PathLike) else str(x)]
        else:
            args += [flag, os.fspath(v) if isinstance(v, os.PathLike) else str(v)]
    return args


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    cols = {}
    for i, name in enumerate(rows[0]):
        vals = [r[i] for r in rows[1:]]
        try:
            cols[name] = np.array([float(x) for x in vals])
        except ValueError:
            cols[name] = vals
    return cols


def _command(cmd, models, out, options):
    """Runs `stuffed CMD` with the CLI's options into `out` (a temporary directory when None) and
    returns what it wrote: each JSON file as a dict and each CSV file as numpy columns, by name."""
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"stuffed-{cmd}-")
        out = tmp.name
    try:
        models = [] if models is None else models if isinstance(models, (list, tuple)) else [models]
        args = [cmd] + _flags({"model": list(models)}) + _flags(options) + ["--out", os.fspath(out)]
        run_cli(args)
        result = {"out": None if tmp else os.fspath(out)}
        for name in sorted(os.listdir(out)):
            p = os.path.join(out, name)
            stem, ext = os.path.splitext(name)
            if ext == ".json":
                with open(p) as f:
                    result[stem] = json.load(f)
            elif ext == ".csv":
                result[stem] = _read_csv(p)
        nll_out = options.get("nll_out")
        if nll_out is not None and os.path.isfile(nll_out):
            result["nll"] = np.fromfile(nll_out, dtype="<f4")
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def ppl(model=None, text=None, out=None, **options):
    """`stuffed ppl`: loss against position. `model`: a path or name, or a list to compare; `text`:
    a file, a directory of .txt files, or a list. Options as the CLI's flags (`max_tokens=`,
    `chunk=`, `bucket=`, `train_len=`, `forget=` (a string or a list), `concat=True`,
    `nll_out=PATH`, …). Returns {"results": results.json, "loss": loss.csv's columns, "nll": the
    `nll_out` file's floats when it names a file, "out": the directory or None}. With neither model
    nor text: the shipped pair on the held-out novel, as the CLI."""
    if text is not None:
        options["text"] = list(text) if isinstance(text, (list, tuple)) else [text]
    return _command("ppl", model, out, options)


def passkey(model, out=None, **options):
    """`stuffed passkey`: retrieval over a grid (`lengths="1k,2k"`, `samples=`, `depths=`, …).
    Returns {"summary": summary.json, …every CSV's columns…}."""
    return _command("passkey", model, out, options)


def probe(model, text=None, out=None, **options):
    """`stuffed probe`: retention, state statistics and snapshots (`every=`, `max_tokens=`, …).
    Returns each JSON and CSV file it writes, by name."""
    if text is not None:
        options["text"] = list(text) if isinstance(text, (list, tuple)) else [text]
    return _command("probe", model, out, options)


def calibrate(model, text=None, out=None, **options):
    """`stuffed calibrate`: one Δ (or A, `method="decay"`) factor per layer at a target length
    (`length="16k"`, `windows=`, `steps=`, `objective="passkey"`, …). Returns {"calibrate":
    calibrate.json, …}; its `forget` string (`calibrate["forget"]`) is what `Model(forget=…)`,
    `ppl(forget=…)` and `passkey(forget=…)` take."""
    if text is not None:
        options["text"] = list(text) if isinstance(text, (list, tuple)) else [text]
    return _command("calibrate", model, out, options)


def longmamba(model, text=None, out=None, **options):
    """`stuffed longmamba`: LongMamba's calibration for Mamba-2 (`train_len=`, `target=`, `windows=`,
    `top=`, `aggregate=`). Returns {"longmamba": longmamba.json, with `retention` and `threshold` per
    layer and head}; give `out` to keep the file that `forget="longmamba:file=OUT/longmamba.json"`
    reads."""
    if text is not None:
        options["text"] = list(text) if isinstance(text, (list, tuple)) else [text]
    return _command("longmamba", model, out, options)


def effrem(model, text=None, out=None, **options):
    """`stuffed effrem`: effective remembrance (Buitrago & Gu 2025), the total variation between
    the prediction after T tokens and after only their last T − t (`at="2k,8k"`, `starts=` or
    `points=`, `sequences=`, `forget=`, …). Returns {"effrem": effrem.json, with its `summary` (mean
    and standard error per target and start) and `units` (every sequence's distances)}; the same
    summary is in effrem.csv, written to `out` when given."""
    if text is not None:
        options["text"] = list(text) if isinstance(text, (list, tuple)) else [text]
    return _command("effrem", model, out, options)
