#!/usr/bin/env python3
"""Train tiny Mamba-2 LMs (HF Mamba2ForCausalLM, pure-torch path) for `stuffed` (issue 5).

Reproduces, at tiny scale, the central claim of Stuffed Mamba (SPEC.md §3): with the same
architecture and state size, a model trained on SHORT windows never learns to forget and its loss
explodes past its training length, while one trained on LONG enough windows stays flat.

Corpus (host/assets/corpus/): the training text is the five Austen novels stored as
austen_train.txt.gz (Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice, Sense and
Sensibility, concatenated with <|endoftext|> between novels); austen_persuasion.txt is the
HELD-OUT text and is never trained on (nor used to train the tokenizer).

Tokenizer: byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer with add_prefix_space=False and
use_regex=True, ByteLevel decoder, no normalizer), vocab 8,192, <|endoftext|> = id 0, trained once
on the training corpus with the `tokenizers` library (single-threaded, so deterministic) and kept
at models/mamba2-tiny-l4-t64-a3-4m/tokenizer.json (the shipped t64 model's); every model directory gets a copy.
`--retrain-tokenizer` rebuilds it.

Training: random windows of --train-len tokens drawn inside one novel (never across a boundary),
--batch-tokens tokens per step (so batch = batch_tokens / train_len windows) and a fixed budget of
--tokens training tokens, so short- and long-window models take the same number of steps with the
same learning-rate schedule (linear warmup, cosine decay to 10 %), AdamW, grad clip 1.0.

Output directory: config.json, model.safetensors (f32, tied embeddings: no lm_head.weight),
tokenizer.json and training.json (train_len, state_size N_S as SPEC.md §1 counts it, the exact
command, seed, hyperparameters, tokens, wall time, loss log and `heldout`: the mean NLL in f32,
from the zero state, over the real vocab, of positions 1..2047 of the first 2,048 tokens of
austen_persuasion.txt tokenized whole; the Rust CI test reproduces it).

Run from the repository root, one thread (the machine is shared), in a venv WITHOUT mamba_ssm:

    OMP_NUM_THREADS=1 /root/pyref/bin/python tools/train_tiny.py --out models/mamba2-tiny-l4-t64-a3-4m --train-len 64 \
        --tokens 4e6 --batch-tokens 4096 --layers 4 --a-min 1e-3 --a-max 1e-2 --log-every 50
    OMP_NUM_THREADS=1 /root/pyref/bin/python tools/train_tiny.py --out models/mamba2-tiny-l4-t2048-a3-4m --train-len 2048 \
        --tokens 4e6 --batch-tokens 4096 --layers 4 --a-min 1e-3 --a-max 1e-2 --log-every 50

(the shipped pair: 53-54 minutes each on one shared CPU core at about 1.2k tokens/s; about half that on
an idle core; a GPU would take a few minutes).  --dt-min/--dt-max/
--dt-floor set HF's dt init (time_step_min/max/floor; HF default [1e-3, 1e-1], floor 1e-4); --a-min/--a-max
replace HF's A_log = log(1..H) by log(linspace(a_min, a_max, H)): with |A| ≈ 1e-3..1e-2 every head starts
as a near-integrator (memory 1/(Δ·|A|) of 10^3..10^6 tokens), so forgetting has to be learned.

Passkey data (issue 5): --passkey-frac F makes F of the windows packed SPEC.md §2.2 passkey samples
(code template, answer ` {key}.` weighted by --answer-weight); 0 (default) leaves training unchanged.

Interruptions: every --checkpoint-every steps (default 100) the model, the AdamW state, the step, the
data sampler's RNG, torch's RNG and the passkey RNG go atomically to OUT.ckpt/checkpoint.pt; SIGTERM or
Ctrl-C finishes the step in flight, checkpoints and exits; rerunning the same command resumes and ends
with the same weights, bit for bit, as an uninterrupted run (tools/test_train_resume.sh proves it for
--stop-at-step, SIGTERM and SIGKILL). A checkpoint made with other arguments is refused. Run long
trainings in the background with a log, e.g.
    nohup OMP_NUM_THREADS=1 python tools/train_tiny.py --out models/X ... >> models/X.log 2>&1 &
and rerun the same line after a reboot.

--device cuda trains on a GPU (tools/gpu_train.sh runs a whole plan there in one device call): the
initial weights and every batch are drawn on the CPU as in a CPU run, so only float rounding differs;
deterministic algorithms without TF32, so the same command, GPU and versions should rebuild the weights
(not yet checked by a second run on a GPU).

--autocast bf16 runs the forward and backward under torch's CPU bf16 autocast (weights, AdamW and the
loss in f32). On a 2-core Xeon with AVX512-BF16 but no AMX (2026-12-03, shipped short model's shape,
one thread, 3 alternating pairs on a loaded machine) it was SLOWER: 946 tok/s against 1,177 tok/s in
f32 (paired medians); on an AMD EPYC with AVX512-BF16 (2026-12-04) it was 1.2x faster, and the
shipped pair's recipe trained under it gave the same T_forget verdicts on all four held-out texts
(models/autocast/, models/EXPERIMENTS.md). So use it where it measures faster; f32 stays the default so
every recorded command rebuilds its weights bit for bit. On an AMX CPU (`lscpu`: amx_bf16) measure again
(ONEDNN_VERBOSE=1 shows whether oneDNN picked an `avx512_core_amx` kernel).

See models/EXPERIMENTS.md for every configuration trained and its measured T_forget verdict.
"""
import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import shlex
import signal
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

for _m in ("mamba_ssm", "causal_conv1d"):
    if importlib.util.find_spec(_m) is not None:
        sys.exit(f"{_m} is importable in this venv: transformers would use its kernels; use a venv without it")

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Mamba2Config, Mamba2ForCausalLM

transformers.logging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "host", "assets", "corpus")
TRAIN_FILE = os.path.join(CORPUS, "austen_train.txt.gz")
HELDOUT_FILE = os.path.join(CORPUS, "austen_persuasion.txt")
TOKENIZER_FILE = os.path.join(ROOT, "models", "mamba2-tiny-l4-t64-a3-4m", "tokenizer.json")
EOT = "<|endoftext|>"
HELDOUT_TOKENS = 2048

# SPEC.md §2.2, the 'code' template (exact strings; what `stuffed passkey` uses by default)
PK_PREFIX = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
PK_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PK_NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey.\n"
PK_SUFFIX = "\nWhat is the pass key? The passkey is"
PK_ANSWER = " {key}."


class PasskeyMaker:
    """Passkey training samples built as `stuffed passkey` builds its prompts (SPEC.md §2.2, code
    template): prefix, num_blocks = (L - |prefix| - |suffix|) // |noise| noise blocks (token counts of
    the parts alone) with the needle replacing a uniformly random block, suffix, then the answer
    ` {key}.`; key = 5 uniform digits, zero-padded. The whole text is tokenized at once. Returns the
    token ids and the number of prompt tokens (the answer starts there)."""

    def __init__(self, tok, seed):
        self.tok = tok
        self.rng = random.Random(seed)
        n = lambda s: len(tok.encode(s, add_special_tokens=False).ids)
        self.n_prefix, self.n_noise, self.n_suffix = n(PK_PREFIX), n(PK_NOISE), n(PK_SUFFIX)

    def sample(self, length):
        num_blocks = max(1, (length - self.n_prefix - self.n_suffix) // self.n_noise)
        key = f"{self.rng.randrange(100000):05d}"
        blocks = [PK_NOISE] * num_blocks
        blocks[self.rng.randrange(num_blocks)] = PK_NEEDLE.format(key=key)
        prompt = PK_PREFIX + "".join(blocks) + PK_SUFFIX
        ids = self.tok.encode(prompt + PK_ANSWER.format(key=key), add_special_tokens=False).ids
        n_prompt = len(self.tok.encode(prompt, add_special_tokens=False).ids)
        assert ids[:n_prompt] == self.tok.encode(prompt, add_special_tokens=False).ids
        return ids, n_prompt

    def window(self, T, lo, hi):
        """T+1 tokens: passkey samples of uniform target length in [lo, min(hi, room)] packed one after
        another, each followed by <|endoftext|> (id 0); the tail that fits no sample is padding.
        Returns ids, per-target weights kind (0 pad, 1 text, 2 answer) for positions 1..T."""
        ids, kind = [], []
        while True:
            room = T + 1 - len(ids) - 8  # answer (<= 7 tokens) + <|endoftext|>
            if room < lo:
                break
            s, n_prompt = self.sample(self.rng.randint(lo, min(hi, room)))
            if len(ids) + len(s) + 1 > T + 1:
                break
            kind += [1] * n_prompt + [2] * (len(s) - n_prompt) + [1]
            ids += s + [0]
        pad = T + 1 - len(ids)
        ids += [0] * pad
        kind += [0] * pad
        return ids, kind[1:]


def read_train_docs():
    """The training novels: austen_train.txt.gz split at <|endoftext|>."""
    with gzip.open(TRAIN_FILE, "rt", encoding="utf-8") as f:
        text = f.read()
    docs = [d for d in text.split(EOT) if d.strip()]
    assert len(docs) == 5, len(docs)
    return docs


def build_tokenizer(docs, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    assert tok.token_to_id(EOT) == 0, tok.token_to_id(EOT)
    return tok


def get_tokenizer(docs, vocab_size, retrain):
    if retrain or not os.path.exists(TOKENIZER_FILE):
        t0 = time.time()
        tok = build_tokenizer(docs, vocab_size)
        os.makedirs(os.path.dirname(TOKENIZER_FILE), exist_ok=True)  # it lives in a model dir now
        tok.save(TOKENIZER_FILE)
        print(f"trained tokenizer ({tok.get_vocab_size()} ids) in {time.time() - t0:.1f}s -> {TOKENIZER_FILE}", flush=True)
    tok = Tokenizer.from_file(TOKENIZER_FILE)
    assert tok.token_to_id(EOT) == 0
    return tok


def state_size(cfg):
    """N_S as SPEC.md §1 counts it: n_layer·[H·P·N + (d_inner + 2·G·N)·(d_conv − 1)]."""
    di = cfg.expand * cfg.hidden_size
    return cfg.num_hidden_layers * (cfg.num_heads * cfg.head_dim * cfg.state_size
                                    + (di + 2 * cfg.n_groups * cfg.state_size) * (cfg.conv_kernel - 1))


@torch.no_grad()
def heldout_nll(model, ids, real_vocab):
    """Mean NLL (f32, zero state, real vocab) of positions 1..len-1 of `ids`."""
    x = torch.tensor(ids, dtype=torch.long)[None]
    logits = model(x, use_cache=False).logits[0, :-1, :real_vocab].float()
    nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
    return nll.mean().item(), nll


# Flags that do not change what a run computes: a checkpoint made under other values still resumes.
RUN_CONTROL = ("checkpoint_every", "checkpoint_dir", "stop_at_step", "log_every", "out")


def run_identity(args):
    """The arguments that decide every number of a run (a resumed run must be given the same). The
    default --device cpu and an empty --extra-text are left out, so checkpoints made before those flags
    existed still resume; an extra text counts by its content (sha256), not by where it lies."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in RUN_CONTROL + ("extra_text",) and not (k == "device" and v == "cpu")
            and not (k == "extra_text_sha256" and not v)}


def read_extra_docs(paths):
    """--extra-text files: UTF-8, documents separated by <|endoftext|> (tools/web_bible.py writes one).
    Returns the documents and the sha256 of each file's bytes as read (the run's identity)."""
    docs, shas = [], []
    for p in paths:
        with open(p, "rb") as f:
            raw = f.read()
        shas.append(hashlib.sha256(raw).hexdigest())
        docs += [d for d in raw.decode("utf-8").split(EOT) if d.strip()]
    return docs, shas


def device_name(device):
    return "cpu" if device == "cpu" else f"cuda: {torch.cuda.get_device_name()} (deterministic algorithms, no TF32)"


def save_checkpoint(path, payload):
    """Writes atomically: a kill mid-write leaves the previous checkpoint whole."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, args):
    if not os.path.exists(path):
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["identity"] != run_identity(args):
        diff = {k: (ck["identity"].get(k), v) for k, v in run_identity(args).items() if ck["identity"].get(k) != v}
        sys.exit(f"{path}: checkpoint of another run (differs in {diff}); remove it or rerun with its arguments")
    return ck


def lr_at(step, total, warmup, peak, floor_frac=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--train-len", type=int, required=True, help="training window, tokens")
    ap.add_argument("--tokens", type=float, default=3e6, help="training-token budget (default 3e6)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--conv", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64, help="HF chunk_size (SSD chunk; does not change the math)")
    ap.add_argument("--dt-min", type=float, default=1e-3, help="HF time_step_min (dt init, log-uniform)")
    ap.add_argument("--dt-max", type=float, default=1e-1, help="HF time_step_max")
    ap.add_argument("--dt-floor", type=float, default=1e-4, help="HF time_step_floor")
    ap.add_argument("--a-min", type=float, default=0.0,
                    help="with --a-max: A_log = log(linspace(a_min, a_max, H)) in every layer instead of HF's log(1..H)")
    ap.add_argument("--a-max", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=30, help="warmup steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=8192, help="tokenizer vocab (only when (re)training it)")
    ap.add_argument("--retrain-tokenizer", action="store_true")
    ap.add_argument("--passkey-frac", type=float, default=0.0,
                    help="fraction of each batch's windows that are packed passkey samples (SPEC.md §2.2 code template)")
    ap.add_argument("--passkey-min", type=int, default=64, help="shortest passkey prompt, tokens (target length)")
    ap.add_argument("--passkey-max", type=int, default=0, help="longest passkey prompt (0: train_len - 8)")
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="loss weight of the answer tokens (` {key}.`) relative to other tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="steps between checkpoints (model, optimizer, data position, RNGs) in --checkpoint-dir; 0: none")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="where the checkpoint lives (default: OUT.ckpt); a run whose checkpoint exists resumes from it")
    ap.add_argument("--stop-at-step", type=int, default=0,
                    help="checkpoint and exit after this many steps (an interruption on purpose; rerun to resume)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the forward, backward and optimizer run (init, data and the held-out NLL stay on "
                         "the CPU, so a cuda run starts from the same weights and sees the same windows)")
    ap.add_argument("--extra-text", action="append", default=[], metavar="FILE",
                    help="more training text (documents separated by <|endoftext|>), mixed in uniformly by tokens; "
                         "the tokenizer stays the novels' (e.g. tools/web_bible.py's World English Bible)")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="bf16 autocast of the forward and backward (weights, optimizer and loss stay f32)")
    args = ap.parse_args()
    # Plans (tools/train_queue.sh, gpu_train.sh) pass their lines unexpanded: `~/…` is the home here.
    args.extra_text = [os.path.expanduser(p) for p in args.extra_text]
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if args.device == "cuda":
        # Deterministic kernels, so the same command on the same GPU and versions rebuilds the weights.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t_start = time.time()
    print(f"torch {torch.__version__} transformers {transformers.__version__}; {command}", flush=True)

    docs = read_train_docs()
    tok = get_tokenizer(docs, args.vocab, args.retrain_tokenizer)
    n_novels = len(docs)
    extra_docs, args.extra_text_sha256 = read_extra_docs(args.extra_text)
    docs += extra_docs
    real_vocab = tok.get_vocab_size()
    rows = (real_vocab + 15) // 16 * 16
    doc_ids = [torch.tensor(tok.encode(d, add_special_tokens=False).ids, dtype=torch.long) for d in docs]
    n_train = sum(len(d) for d in doc_ids)
    with open(HELDOUT_FILE, encoding="utf-8") as f:
        heldout_ids = tok.encode(f.read(), add_special_tokens=False).ids
    n_extra = sum(len(d) for d in doc_ids[n_novels:])
    print(f"vocab {real_vocab} (rows {rows}); train tokens {n_train:,} in {n_novels} novels"
          + (f" + {len(doc_ids) - n_novels} --extra-text documents ({n_extra:,} tokens)" if args.extra_text else "") + "; "
          f"held-out {len(heldout_ids):,} tokens", flush=True)

    T = args.train_len
    assert args.batch_tokens % T == 0, "--batch-tokens must be a multiple of --train-len"
    batch = args.batch_tokens // T
    steps = int(round(args.tokens / args.batch_tokens))
    assert args.hidden * args.expand % args.head_dim == 0
    cfg = Mamba2Config(
        vocab_size=rows, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=args.d_state,
        head_dim=args.head_dim, num_heads=args.hidden * args.expand // args.head_dim, expand=args.expand,
        conv_kernel=args.conv, chunk_size=args.chunk, n_groups=1, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        time_step_min=args.dt_min, time_step_max=args.dt_max, time_step_floor=args.dt_floor,
    )
    model = Mamba2ForCausalLM(cfg).float()
    a_init = "log(1..H) (HF)"
    if args.a_max > 0:
        a = torch.linspace(args.a_min, args.a_max, cfg.num_heads)
        for layer in model.backbone.layers:
            layer.mixer.A_log.data.copy_(torch.log(a))
        a_init = f"log(linspace({args.a_min}, {args.a_max}, H))"
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    ns = state_size(cfg)
    print(f"model: d {cfg.hidden_size} L {cfg.num_hidden_layers} H {cfg.num_heads} P {cfg.head_dim} "
          f"N {cfg.state_size}; params {n_params:,}; N_S {ns:,}; train_len {T}, batch {batch}, steps {steps}",
          flush=True)

    # parameters: no weight decay on norms, biases, A_log, D, dt_bias (1-D tensors)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.tensor([len(d) - T - 1 for d in doc_ids], dtype=torch.float64)
    assert (lens > 0).all()
    n_pk = int(round(args.passkey_frac * batch))
    pk_max = args.passkey_max or T - 8
    if n_pk:
        pk = PasskeyMaker(tok, args.seed + 1)
        print(f"passkey: {n_pk} of {batch} windows per step, prompt lengths [{args.passkey_min}, {pk_max}], "
              f"answer weight {args.answer_weight}", flush=True)
    log = []
    model.train()
    ema = None
    pk_hist = []
    first_step, trained_s = 0, 0.0
    ck_path = os.path.join(args.checkpoint_dir or args.out.rstrip("/") + ".ckpt", "checkpoint.pt")
    ck = load_checkpoint(ck_path, args)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        if n_pk:
            pk.rng.setstate(ck["passkey_rng"])
        first_step, trained_s = ck["step"], ck["trained_s"]
        log, ema, pk_hist = ck["log"], ck["ema"], ck["pk_hist"]
        print(f"resumed from {ck_path} at step {first_step}/{steps}", flush=True)

    def checkpoint(done):
        save_checkpoint(ck_path, {
            "identity": run_identity(args), "step": done, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "passkey_rng": pk.rng.getstate() if n_pk else None, "log": log, "ema": ema, "pk_hist": pk_hist,
            "trained_s": trained_s + time.time() - t0})

    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    # SIGTERM / SIGINT finish the step in flight, checkpoint and exit (a kill -9 loses at most
    # --checkpoint-every steps).
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, f: stop.append(n))
    t0 = time.time()
    for step in range(first_step, steps):
        which = torch.multinomial(lens, batch - n_pk, replacement=True, generator=gen)
        starts = (torch.rand(batch - n_pk, generator=gen, dtype=torch.float64) * lens[which]).long()
        x = torch.stack([doc_ids[w][s:s + T + 1] for w, s in zip(which.tolist(), starts.tolist())])
        if n_pk:
            pw = [pk.window(T, args.passkey_min, pk_max) for _ in range(n_pk)]
            x = torch.cat([torch.tensor([w[0] for w in pw], dtype=torch.long), x])
            kind = torch.cat([torch.tensor([w[1] for w in pw], dtype=torch.long),
                              torch.ones(batch - n_pk, T, dtype=torch.long)])
        x = x.to(dev)
        if n_pk:
            kind = kind.to(dev)
        lr = lr_at(step, steps, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            logits = model(x[:, :-1], use_cache=False).logits[..., :real_vocab]
        if not n_pk:
            loss = F.cross_entropy(logits.reshape(-1, real_vocab).float(), x[:, 1:].reshape(-1))
        else:
            nll = F.cross_entropy(logits.reshape(-1, real_vocab).float(), x[:, 1:].reshape(-1), reduction="none")
            k = kind.reshape(-1)
            w = (k == 1).float() + args.answer_weight * (k == 2).float()
            loss = (nll * w).sum() / w.sum()
            with torch.no_grad():
                ans = k == 2
                ans_nll = nll[ans].mean().item()
                ans_acc = (logits.reshape(-1, real_vocab).argmax(-1)[ans] == x[:, 1:].reshape(-1)[ans]).float().mean().item()
                pk_hist.append((ans_nll, ans_acc))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or step == steps - 1:
            el = time.time() - t0
            tps = (step + 1 - first_step) * args.batch_tokens / el
            print(f"step {step:5d}/{steps} loss {loss.item():.4f} ema {ema:.4f} gnorm {gnorm:.2f} lr {lr:.2e} "
                  f"{tps:,.0f} tok/s eta {(steps - step - 1) * args.batch_tokens / tps:.0f}s"
                  + (f" answer nll {sum(h[0] for h in pk_hist[-20:]) / len(pk_hist[-20:]):.3f} acc "
                     f"{sum(h[1] for h in pk_hist[-20:]) / len(pk_hist[-20:]):.3f}" if n_pk else ""), flush=True)
            log.append({"step": step, "loss": round(loss.item(), 5), "ema": round(ema, 5), "lr": lr})
            if n_pk:
                log[-1]["answer_nll_last20"] = round(sum(h[0] for h in pk_hist[-20:]) / len(pk_hist[-20:]), 5)
                log[-1]["answer_token_acc_last20"] = round(sum(h[1] for h in pk_hist[-20:]) / len(pk_hist[-20:]), 5)
        done = step + 1
        if done < steps and args.checkpoint_every and done % args.checkpoint_every == 0:
            checkpoint(done)
        if (done == args.stop_at_step or stop) and done < steps:
            checkpoint(done)
            why = f"signal {stop[0]}" if stop else "--stop-at-step"
            print(f"stopped at step {done} ({why}); checkpoint {ck_path}; rerun the same command to resume",
                  flush=True)
            sys.exit(0 if not stop else 128 + stop[0])
    train_wall = trained_s + time.time() - t0

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    gen_cfg = os.path.join(args.out, "generation_config.json")
    if os.path.exists(gen_cfg):  # not needed by stuffed
        os.remove(gen_cfg)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    sd = load_file(os.path.join(args.out, "model.safetensors"))
    assert "lm_head.weight" not in sd, sorted(sd)
    for k, v in sd.items():
        assert torch.equal(v, model.state_dict()[k].cpu()), k

    # held-out loss of the SAVED weights (reloaded), as the Rust test will compute it
    reloaded = Mamba2ForCausalLM.from_pretrained(args.out).float().eval()
    ids = heldout_ids[:HELDOUT_TOKENS]
    mean_nll, nll = heldout_nll(reloaded, ids, real_vocab)
    q = [nll[i:i + 256].mean().item() for i in range(0, len(nll), 256)]
    print(f"held-out NLL (first {len(ids)} tokens of austen_persuasion.txt, positions 1..{len(ids) - 1}): "
          f"{mean_nll:.6f}; by 256-token block: {' '.join(f'{v:.3f}' for v in q)}", flush=True)

    info = {
        "model": "Mamba2ForCausalLM (HF transformers, pure-torch path), trained by tools/train_tiny.py",
        "command": command,
        "seed": args.seed,
        "train_len": T,
        "state_size": ns,
        "state_size_formula": "n_layer*[H*P*N + (d_inner + 2*G*N)*(d_conv - 1)] (SPEC.md §1)",
        "params": n_params,
        "arch": {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                 "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "state_size": cfg.state_size,
                 "expand": cfg.expand, "n_groups": cfg.n_groups, "conv_kernel": cfg.conv_kernel,
                 "chunk_size": cfg.chunk_size, "vocab_rows": rows, "tokenizer_vocab": real_vocab,
                 "tie_word_embeddings": True,
                 "init": {"A_log": a_init, "dt": f"log-uniform [{args.dt_min}, {args.dt_max}], floor {args.dt_floor}"}},
        "hyperparameters": {"optimizer": "AdamW", "betas": [0.9, 0.95], "lr": args.lr,
                            "schedule": f"linear warmup {args.warmup} steps, cosine to 10%",
                            "weight_decay": args.weight_decay, "weight_decay_on": "2-D tensors only",
                            "grad_clip": 1.0, "batch_tokens": args.batch_tokens, "batch_windows": batch,
                            "steps": steps, "threads": args.threads, "device": device_name(args.device),
                            "dtype": "f32" if args.autocast == "none" else "f32 weights, bf16 autocast"},
        "training_tokens": steps * args.batch_tokens,
        "train_corpus": {"file": "host/assets/corpus/austen_train.txt.gz", "tokens": n_train - n_extra,
                         "novels": n_novels, "windows": "uniform over tokens, inside one novel"}
        if not args.extra_text else
        {"files": ["host/assets/corpus/austen_train.txt.gz"] + args.extra_text,
         "sha256": [hashlib.sha256(open(TRAIN_FILE, "rb").read()).hexdigest()] + args.extra_text_sha256,
         "tokens": n_train, "novels": n_novels, "novel_tokens": n_train - n_extra,
         "extra_documents": len(doc_ids) - n_novels, "extra_tokens": n_extra,
         "windows": "uniform over the tokens of all documents, inside one document"},
        "final_train_loss_ema": round(ema, 5),
        **({"passkey": {"frac": args.passkey_frac, "windows_per_step": n_pk, "template": "SPEC.md §2.2 code",
                        "prompt_len_range": [args.passkey_min, pk_max], "answer": PK_ANSWER,
                        "packing": "samples packed in a window, each + <|endoftext|>; tail padding not scored",
                        "loss": f"all tokens, answer tokens weighted x{args.answer_weight}",
                        "rng": f"python random.Random(seed + 1)"}} if n_pk else {}),
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "heldout": {"text": "host/assets/corpus/austen_persuasion.txt", "tokenized": "whole file, no special tokens",
                    "slice_tokens": len(ids), "positions": f"1..{len(ids) - 1}", "mean_nll": mean_nll,
                    "compute": "f32, zero state, log-softmax over the tokenizer's vocab (rows >= vocab ignored), "
                               "one full-sequence HF forward on the saved weights",
                    "nll_by_256_block": [round(v, 5) for v in q]},
        "heldout_total_tokens": len(heldout_ids),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     **({"cuda": torch.version.cuda} if args.device == "cuda" else {})},
        "loss_log": log,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    if os.path.exists(ck_path):  # the finished model supersedes it
        os.remove(ck_path)
    print(f"wrote {args.out} ({sum(os.path.getsize(os.path.join(args.out, p)) for p in os.listdir(args.out)):,} bytes) "
          f"in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
