"""The Python package against the `stuffed` CLI's own outputs: logits (`stuffed logits`), per-position
NLL (`stuffed ppl --nll-out`), `ppl`'s results, `generate`'s text, on golden checkpoints from
tests/data and the shipped pair, bit for bit (the same library and kernel path)."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import stuffed

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("STUFFED_BIN", str(ROOT / "target" / "debug" / "stuffed"))
GOLDEN = ["mamba2_hf_g1_untied", "rwkv7_tiny", "gla_tiny", "retnet_tiny", "mamba1_hf", "rwkv6_tiny", "hgrn2_tiny"]
PAIR = [ROOT / "models" / "mamba2-tiny-l4-t64-a3-4m", ROOT / "models" / "mamba2-tiny-l4-t2048-a3-4m"]
NOVEL = ROOT / "host" / "assets" / "corpus" / "austen_persuasion.txt"
IDS = [5, 9, 2, 40, 7, 13, 1, 8, 100, 3, 77, 0]


def cli(*args):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def read_safetensors(path, name):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])[name]
    assert meta["dtype"] == "F32"
    a, b = meta["data_offsets"]
    return np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(meta["shape"])


def cli_logits(model, ids, chunk, tmp_path):
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    out = tmp_path / "logits.safetensors"
    cli("logits", "--model", model, "--ids", tmp_path / "ids.txt", "--out", out, "--chunk", chunk)
    return read_safetensors(out, "logits")


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name", GOLDEN + ["pair"])
def test_forward_equals_cli_logits(name, tmp_path):
    path = PAIR[0] if name == "pair" else ROOT / "tests" / "data" / name
    m = stuffed.Model(path)
    assert same_bits(m.forward(IDS), cli_logits(path, IDS, 256, tmp_path))
    # Streamed a token a call from a state the caller holds: `logits --chunk 1`.
    m1 = stuffed.Model(path, chunk=1)
    state = m1.state()
    rows = np.stack([m1.forward([t], state)[0] for t in IDS])
    assert same_bits(rows, cli_logits(path, IDS, 1, tmp_path))
    # The last position alone, from a snapshot: the state is a plain array.
    s = m1.state()
    m1.forward(IDS[:6], s)
    snap = s.copy()
    a = m1.forward(IDS[6:], s, last=True)
    b = m1.forward(IDS[6:], snap, last=True)
    assert same_bits(a, b) and np.array_equal(s, snap)


@pytest.mark.parametrize("path", PAIR, ids=["t64", "t2048"])
def test_nll_equals_ppl_nll_out(path, tmp_path):
    text = NOVEL.read_text()
    out = tmp_path / "nll.bin"
    cli("ppl", "--model", path, "--text", NOVEL, "--max-tokens", 3000, "--chunk", 512, "--nll-out", out,
        "--out", tmp_path / "o")
    want = np.fromfile(out, dtype="<f4")
    m = stuffed.Model(path)
    got = m.nll(m.encode(text)[:3000])
    assert got.dtype == np.float32 and same_bits(got, want)


def test_ppl_equals_cli(tmp_path):
    opts = ["--max-tokens", "2k", "--bucket", "128", "--chunk", "256", "--forget", "none", "--forget", "dt:c=0.5"]
    cli("ppl", "--model", PAIR[0], "--model", PAIR[1], "--text", NOVEL, *opts, "--out", tmp_path / "cli")
    want = json.loads((tmp_path / "cli" / "results.json").read_text())
    r = stuffed.ppl(PAIR, text=NOVEL, max_tokens="2k", bucket=128, chunk=256, forget=["none", "dt:c=0.5"],
                    out=tmp_path / "py", nll_out=tmp_path / "nll")
    got = r["results"]
    assert len(got["runs"]) == len(want["runs"]) == 4
    for g, w in zip(got["runs"], want["runs"]):
        assert (g["forget"], g["tokens_scored"], g["mean_nll"]) == (w["forget"], w["tokens_scored"], w["mean_nll"])
        assert g["buckets_linear"] == w["buckets_linear"]
    cli_loss = (tmp_path / "cli" / "loss.csv").read_text().splitlines()
    assert r["loss"]["mean_nll"].tolist() == [float(l.split(",")[6]) for l in cli_loss[1:]]
    # Options are the CLI's, checked by it.
    with pytest.raises(RuntimeError, match="'0' for '--chunk .*from 1 up"):
        stuffed.ppl(PAIR[0], text=NOVEL, chunk=0)


def test_generate_equals_cli():
    text = cli("generate", "--model", PAIR[1], "--prompt", "It was", "--max-new", 12)
    m = stuffed.Model(PAIR[1])
    assert m.generate("It was", max_new=12) == text.rstrip("\n")


def test_evaluators_return_dicts_and_arrays(tmp_path):
    r = stuffed.passkey(ROOT / "models" / "mamba2-tiny-passkey", lengths="256", samples=2)
    assert r["out"] is None and "summary" in r and isinstance(r["summary"], dict)
    p = stuffed.probe(PAIR[0], text=NOVEL, max_tokens=1024, every=256, out=tmp_path / "probe")
    assert any(isinstance(v, dict) and v for k, v in p.items() if k != "out")


def test_passkey_takes_oprm():
    r = stuffed.passkey(ROOT / "models" / "mamba2-tiny-passkey", lengths="2k", samples=4, oprm=160, max_new=8)
    s = r["summary"]
    assert s["options"]["oprm"] == {"chunk": 160}
    (row,) = s["accuracy_per_length"]
    assert row["n"] == 4 and 0.0 <= row["oprm_chose_needle"] <= 1.0
    q = stuffed.passkey(ROOT / "models" / "mamba2-tiny-passkey", lengths="1k", samples=2, oprm=160,
                        oprm_select="query", max_new=8)["summary"]
    assert q["options"]["oprm"] == {"chunk": 160, "select": "query"}
    i = stuffed.passkey(ROOT / "models" / "mamba2-tiny-passkey", lengths="1k", samples=2, oprm=160,
                        oprm_idk="Error", max_new=8)["summary"]
    assert i["options"]["oprm"] == {"chunk": 160, "idk": "Error"}


def test_passkey_takes_jrt_and_decimamba():
    s = stuffed.passkey(ROOT / "models" / "mamba2-tiny-passkey", lengths="512", samples=2, jrt=True,
                        forget="decimamba:layers=1,base=200", max_new=8)["summary"]
    assert s["options"]["jrt"] is True
    f = s["options"]["forget"]
    assert (f["method"], f["layers"], f["base"], f["last"]) == ("decimamba", [1], 200.0, 1)
    (row,) = s["accuracy_per_length"]
    # K = 200 of the prompt's tokens but its last, then the last.
    assert row["decimamba_kept"] == [201.0] and 0.0 <= row["decimamba_needle_share"] <= 1.0


def test_ppl_vs_model_against_itself_drifts_by_nothing():
    r = stuffed.ppl(PAIR[0], text=NOVEL, max_tokens=1024, vs_model=PAIR[0])
    drift = r["results"]["runs"][0]["drift"]
    assert drift["buckets_log2"] and all(b["delta_nll"] == 0.0 and b["kl"] == 0.0 for b in drift["buckets_log2"])
    assert (r["drift"]["delta_nll"] == 0.0).all()


def test_errors_are_one_line_exceptions():
    m = stuffed.Model(ROOT / "tests" / "data" / "mamba2_hf_g1_untied")
    info = m.info
    assert info["family"] == "mamba2" and info["state_floats"] == m.state().size
    with pytest.raises(ValueError, match=f"state: 3 floats given, the model's state has {info['state_floats']}"):
        m.forward(IDS, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="token id 256 at position 1 is out of range"):
        m.forward([1, info["vocab_rows"]])
    with pytest.raises(ValueError, match="float32"):
        m.forward(IDS, np.zeros(m.state().size, np.float64))
    with pytest.raises(RuntimeError, match="no such path, and no model acme/none in the Hugging Face cache"):
        stuffed.Model("acme/none")
    with pytest.raises(RuntimeError, match="unknown method 'bogus'"):
        stuffed.Model(ROOT / "tests" / "data" / "mamba2_hf_g1_untied", forget="bogus")


def test_calls_release_the_gil_and_threads_share_a_handle():
    import threading
    import time

    m = stuffed.Model(PAIR[1])
    ids = m.encode(NOVEL.read_text())[:16000]
    halves = [ids[:8000], ids[8000:]]
    serial = [m.nll(h) for h in halves]
    state = m.state()
    serial_last = m.forward(ids[:3000], state, last=True)
    # While nll runs in another thread, this one goes on running Python: with the GIL held for the
    # whole call, one gap below would span the call.
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("nll", m.nll(ids)))
    t0 = last = time.perf_counter()
    gaps = []
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        time.sleep(0.001)
    took = time.perf_counter() - t0
    assert same_bits(box["nll"][: len(serial[0])], serial[0])
    assert len(gaps) > 20 and max(gaps) < took / 2, (len(gaps), max(gaps), took)
    # One handle, several threads at once, each with its own state: the serial numbers, bit for bit.
    out = {}

    def run(i):
        out[i] = m.nll(halves[i])
        s = m.state()
        out[i + 2] = m.forward(ids[:3000], s, last=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same_bits(out[0], serial[0]) and same_bits(out[1], serial[1])
    assert same_bits(out[2], serial_last) and same_bits(out[3], serial_last)


def test_per_layer_factors_through_the_forget_string():
    """`dt:c=c0/c1/…` (one factor per layer, what `stuffed calibrate` writes) through the C ABI: a
    table of one value is that value's uniform method bit for bit; another table differs; a table of
    another length is one error line."""
    same = stuffed.Model(PAIR[0], forget="dt:c=0.3/0.3/0.3/0.3").forward(IDS)
    assert same_bits(same, stuffed.Model(PAIR[0], forget="dt:c=0.3").forward(IDS))
    assert not same_bits(same, stuffed.Model(PAIR[0], forget="dt:c=0.3/1/1/1").forward(IDS))
    with pytest.raises(RuntimeError, match="expected 4 elements, found 3"):
        stuffed.Model(PAIR[0], forget="dt:c=0.3/1/1")


def test_calibrate_returns_factors_the_model_takes():
    r = stuffed.calibrate(PAIR[0], text=NOVEL, length=256, windows=2, steps=2)
    c = r["calibrate"]
    assert c["forget"].startswith("dt:c=") and len(c["factors"]) == 4 and c["loss_best"] < c["loss_none"]
    # The factors as a forget string give the loss calibrate reported (mean NLL of the 2 windows).
    m = stuffed.Model(PAIR[0], forget=c["forget"])
    ids = m.encode(NOVEL.read_text())[:512]
    nll = np.concatenate([m.nll(ids[:256]), m.nll(ids[256:])]).astype(np.float64)
    assert abs(nll.mean() - c["loss_best"]) < 1e-6


def test_longmamba_writes_thresholds_the_model_takes(tmp_path):
    r = stuffed.longmamba(PAIR[0], text=NOVEL, out=tmp_path, train_len=64, target="2k", windows=4)["longmamba"]
    assert r["targets"] == [2048] and len(r["threshold"]) == 1
    assert len(r["retention"]) == 4 and all(len(row) == 8 for row in r["threshold"][0])
    m = stuffed.Model(PAIR[0])
    lm = stuffed.Model(PAIR[0], forget=f"longmamba:file={tmp_path / 'longmamba.json'}")
    ids = m.encode(NOVEL.read_text())[:300]
    assert not np.array_equal(m.nll(ids), lm.nll(ids))


def test_effrem_is_the_tv_of_two_forwards():
    """`stuffed.effrem`'s TV at (T, t) is that of the last-position distributions of two forwards:
    the first T tokens, and their tokens t … T−1, each from the zero state."""
    r = stuffed.effrem(PAIR[0], text=NOVEL, at="64,128", starts="1,32,100", sequences=1)["effrem"]
    m = stuffed.Model(PAIR[0])
    real = m.info["real_vocab"]
    ids = m.encode(NOVEL.read_text())[:128]

    def probs(toks):
        z = m.forward(toks, last=True).reshape(-1)[:real].astype(np.float64)
        e = np.exp(z - z.max())
        return e / e.sum()

    rows = {(s["at"], s["start"]): s for s in r["summary"]}
    assert set(rows) == {(64, 1), (64, 32), (128, 1), (128, 32), (128, 100)}
    for (at, start), s in rows.items():
        tv = 0.5 * np.abs(probs(ids[:at]) - probs(ids[start:at])).sum()
        assert abs(s["tv_mean"] - tv) < 1e-5 and s["kept"] == at - start
    assert rows[(128, 100)]["tv_mean"] > 1e-3


def test_state_is_a_tuned_models_start():
    """`Model.state()` is where a stream starts: zeros, or a state-tuned RWKV's own state."""
    assert not stuffed.Model(ROOT / "tests" / "data" / "rwkv6_tiny").state().any()
    tuned = stuffed.Model(ROOT / "tests" / "data" / "rwkv6_time_state")
    s = tuned.state()
    assert s.any()
    a = tuned.forward([1, 2], s.copy())
    b = tuned.forward([1, 2], np.zeros_like(s))
    assert not np.array_equal(a, b)


def test_state_file_beside_the_model():
    """`Model(path, state_file=...)` starts from the file's states: the start the same states merged
    into a model give (the state holds no other weight)."""
    data = ROOT / "tests" / "data"
    m = stuffed.Model(data / "rwkv6_bf16_m3_d5", state_file=data / "rwkv6_time_state_file" / "state.pth")
    assert np.array_equal(m.state(), stuffed.Model(data / "rwkv6_time_state").state())
    assert m.info["state_file"].endswith("state.pth")
    assert not stuffed.Model(data / "rwkv6_bf16_m3_d5").state().any()
