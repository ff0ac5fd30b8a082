//! The ABI's checks and contracts, through the exported functions themselves.
use super::*;
use std::ptr::{null, null_mut};

fn golden(name: &str) -> CString {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name);
    CString::new(p.to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(stuffed_last_error()) }.to_str().unwrap().to_string()
}

struct Open(*mut StuffedModel);

impl Drop for Open {
    fn drop(&mut self) {
        unsafe { stuffed_close(self.0) }
    }
}

fn open(name: &str) -> Open {
    let mut m = null_mut();
    let st = unsafe { stuffed_open(golden(name).as_ptr(), &mut m) };
    assert_eq!(st, StuffedStatus::Ok, "{}", last_error());
    Open(m)
}

fn info(m: &Open) -> StuffedInfo {
    let mut i = std::mem::MaybeUninit::uninit();
    assert_eq!(unsafe { stuffed_info(m.0, i.as_mut_ptr()) }, StuffedStatus::Ok);
    unsafe { i.assume_init() }
}

/// The committed header is what cbindgen makes of this crate now.
#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new().with_crate(dir).with_config(config).generate().expect("cbindgen").write(&mut out);
    let path = dir.join("stuffed.h");
    if std::env::var("STUFFED_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &out).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == out,
        "capi/stuffed.h is stale: run `STUFFED_BLESS=1 cargo test -p stuffed-capi header` and commit it"
    );
}

#[test]
fn facts_and_opening_errors() {
    let m = open("mamba2_hf_g1_untied");
    let i = info(&m);
    assert_eq!(unsafe { CStr::from_ptr(i.family) }.to_str().unwrap(), "mamba2");
    assert!(i.d_model > 0 && i.n_layer > 0 && i.real_vocab <= i.vocab_rows);
    assert_eq!(i.state_floats, unsafe { stuffed_state_len(m.0) });
    assert_eq!(i.state_bytes, 4 * i.state_floats);

    let mut h = null_mut();
    let missing = CString::new("/nonexistent/model").unwrap();
    assert_eq!(unsafe { stuffed_open(missing.as_ptr(), &mut h) }, StuffedStatus::Failed);
    assert!(h.is_null());
    assert!(last_error().starts_with("/nonexistent/model"), "{}", last_error());
    // A name that is no path and not in the cache: where it looked.
    std::env::set_var("HF_HUB_CACHE", "/nonexistent/hub");
    let name = CString::new("acme/none").unwrap();
    assert_eq!(unsafe { stuffed_open(name.as_ptr(), &mut h) }, StuffedStatus::Failed);
    assert!(last_error().contains("/nonexistent/hub/models--acme--none"), "{}", last_error());
}

#[test]
fn null_pointers_are_errors() {
    let m = open("mamba2_hf_g1_untied");
    let n = unsafe { stuffed_state_len(m.0) };
    let mut state = vec![0f32; n];
    let (ids, mut out, mut k) = ([1u32, 2], vec![0f32; 4096], 0usize);
    let s = state.as_mut_ptr();
    unsafe {
        let mut h = null_mut();
        assert_eq!(stuffed_open(null(), &mut h), StuffedStatus::Null);
        assert_eq!(last_error(), "path: null pointer");
        assert_eq!(stuffed_open(golden("x").as_ptr(), null_mut()), StuffedStatus::Null);
        assert_eq!(stuffed_info(null(), null_mut()), StuffedStatus::Null);
        assert_eq!(stuffed_state_len(null()), 0);
        assert_eq!(stuffed_state_zero(m.0, null_mut(), n), StuffedStatus::Null);
        assert_eq!(stuffed_forward(null(), s, n, ids.as_ptr(), 2, out.as_mut_ptr(), 0, 0), StuffedStatus::Null);
        assert_eq!(stuffed_forward(m.0, s, n, null(), 2, out.as_mut_ptr(), 0, 0), StuffedStatus::Null);
        assert_eq!(last_error(), "tokens: null pointer");
        assert_eq!(stuffed_nll(m.0, s, n, ids.as_ptr(), null(), 2, out.as_mut_ptr()), StuffedStatus::Null);
        assert_eq!(stuffed_generate(m.0, s, n, ids.as_ptr(), 2, 4, -1, null_mut(), &mut k), StuffedStatus::Null);
        assert_eq!(stuffed_encode(m.0, null(), null_mut(), 0, &mut k), StuffedStatus::Null);
        assert_eq!(stuffed_decode(m.0, ids.as_ptr(), 2, null_mut(), 0, &mut k), StuffedStatus::Null);
        assert_eq!(stuffed_set_forget(m.0, null()), StuffedStatus::Null);
        stuffed_close(null_mut());
    }
}

#[test]
fn sizes_and_ids_are_checked_and_a_failed_call_keeps_the_state() {
    let m = open("mamba2_hf_g1_untied");
    let i = info(&m);
    let (n, v) = (i.state_floats, i.vocab_rows);
    let mut state = vec![0f32; n];
    let ids = [3u32, 7, 11];
    let mut logits = vec![0f32; 3 * v];
    unsafe {
        // A state one float short, one float long.
        for len in [n - 1, n + 1] {
            let mut wrong = vec![0f32; len];
            let st = stuffed_forward(m.0, wrong.as_mut_ptr(), len, ids.as_ptr(), 3, logits.as_mut_ptr(), 3 * v, 1);
            assert_eq!(st, StuffedStatus::Size);
            assert_eq!(last_error(), format!("state: {len} floats given, the model's state has {n}"));
        }
        let s = state.as_mut_ptr();
        assert_eq!(stuffed_forward(m.0, s, n, ids.as_ptr(), 3, logits.as_mut_ptr(), 2 * v, 1), StuffedStatus::Size);
        assert_eq!(stuffed_forward(m.0, s, n, ids.as_ptr(), 3, logits.as_mut_ptr(), 3 * v, 0), StuffedStatus::Size);
        assert_eq!(stuffed_forward(m.0, s, n, ids.as_ptr(), 0, logits.as_mut_ptr(), 0, 1), StuffedStatus::Size);
        assert_eq!(stuffed_state_zero(m.0, s, n + 1), StuffedStatus::Size);
        // Run some tokens, then a call with a bad id: the error names it, the state stays.
        assert_eq!(stuffed_forward(m.0, s, n, ids.as_ptr(), 3, logits.as_mut_ptr(), 3 * v, 1), StuffedStatus::Ok);
        let before = state.clone();
        let bad = [1u32, v as u32];
        let st = stuffed_forward(m.0, state.as_mut_ptr(), n, bad.as_ptr(), 2, logits.as_mut_ptr(), v, 0);
        assert_eq!(st, StuffedStatus::Range);
        assert_eq!(
            last_error(),
            format!("tokens: token id {v} at position 1 is out of range (the model's embedding has {v} rows)")
        );
        assert_eq!(state, before);
        let mut nll = [0f32; 2];
        let tg = [1u32, i.real_vocab as u32];
        let st = stuffed_nll(m.0, state.as_mut_ptr(), n, ids.as_ptr(), tg.as_ptr(), 2, nll.as_mut_ptr());
        assert_eq!(st, StuffedStatus::Range, "{}", last_error());
        let mut k = 0;
        let mut buf = [0 as c_char; 8];
        let huge = [1u32, 1 << 30];
        assert_eq!(stuffed_decode(m.0, huge.as_ptr(), 2, buf.as_mut_ptr(), 8, &mut k), StuffedStatus::Range);
        assert!(last_error().starts_with("ids: token id 1073741824 at position 1 is outside"), "{}", last_error());
        assert_eq!(stuffed_nll_stream(m.0, ids.as_ptr(), 3, 512, nll.as_mut_ptr(), 1), StuffedStatus::Size);
        assert_eq!(stuffed_set_chunk(m.0, 0), StuffedStatus::Size);
    }
}

/// A copied state continues exactly as the original (snapshot/restore is a memcpy); logits of the
/// last position equal the last row of all positions; the NLL is the log-softmax of those logits.
#[test]
fn states_are_plain_floats_and_the_outputs_agree() {
    let m = open("mamba2_hf_g1_untied");
    let i = info(&m);
    let (n, v, real) = (i.state_floats, i.vocab_rows, i.real_vocab);
    let prefix = [5u32, 9, 2, 40, 7];
    let rest = [13u32, 1, 8];
    let mut state = vec![1f32; n];
    unsafe {
        assert_eq!(stuffed_state_zero(m.0, state.as_mut_ptr(), n), StuffedStatus::Ok);
        assert!(state.iter().all(|&x| x == 0.0));
        let mut all = vec![0f32; prefix.len() * v];
        let st = stuffed_forward(m.0, state.as_mut_ptr(), n, prefix.as_ptr(), 5, all.as_mut_ptr(), all.len(), 1);
        assert_eq!(st, StuffedStatus::Ok);
        assert!(state.iter().any(|&x| x != 0.0));
        let snap = state.clone();
        let mut a = vec![0f32; rest.len() * v];
        let mut b = a.clone();
        stuffed_forward(m.0, state.as_mut_ptr(), n, rest.as_ptr(), 3, a.as_mut_ptr(), a.len(), 1);
        let mut copy = snap.clone();
        stuffed_forward(m.0, copy.as_mut_ptr(), n, rest.as_ptr(), 3, b.as_mut_ptr(), b.len(), 1);
        assert_eq!(a, b);
        assert_eq!(state, copy);
        // Last only: the same numbers as the last row (token by token through the chunk 1 path too).
        let mut last = vec![0f32; v];
        let mut z = vec![0f32; n];
        stuffed_forward(m.0, z.as_mut_ptr(), n, prefix.as_ptr(), 5, last.as_mut_ptr(), v, 0);
        let row = &all[4 * v..];
        assert!(last.iter().zip(row).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs())));
        // NLL of targets = logsumexp(real logits) − logit(target).
        let targets = [9u32, 2, 40, 7, 0];
        let mut nll = [0f32; 5];
        let mut z = vec![0f32; n];
        let st = stuffed_nll(m.0, z.as_mut_ptr(), n, prefix.as_ptr(), targets.as_ptr(), 5, nll.as_mut_ptr());
        assert_eq!(st, StuffedStatus::Ok, "{}", last_error());
        for (p, (&t, &got)) in targets.iter().zip(&nll).enumerate() {
            let r = &all[p * v..p * v + real];
            let mx = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = mx + r.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            let want = lse - r[t as usize] as f64;
            assert!((got as f64 - want).abs() < 1e-3, "position {p}: {got} vs {want}");
        }
        // The whole stream's NLL: the same values for positions 1..
        let mut stream = [0f32; 4];
        let st = stuffed_nll_stream(m.0, prefix.as_ptr(), 5, 512, stream.as_mut_ptr(), 4);
        assert_eq!(st, StuffedStatus::Ok, "{}", last_error());
        assert!(stream.iter().zip(&nll[..4]).all(|(a, b)| (a - b).abs() < 1e-4), "{stream:?} {nll:?}");
    }
}

#[test]
fn greedy_tokenizer_and_forget() {
    let m = open("mamba2_hf_g1_untied");
    let i = info(&m);
    let (n, v) = (i.state_floats, i.vocab_rows);
    unsafe {
        // Encode: too small a buffer says how many; decode round-trips.
        let text = CString::new("Hello world, hello").unwrap();
        let mut k = 0;
        let mut ids = [0u32; 64];
        assert_eq!(stuffed_encode(m.0, text.as_ptr(), ids.as_mut_ptr(), 1, &mut k), StuffedStatus::Size);
        let need = k;
        assert!(need > 1);
        assert_eq!(stuffed_encode(m.0, text.as_ptr(), ids.as_mut_ptr(), 64, &mut k), StuffedStatus::Ok);
        assert_eq!(k, need);
        let mut buf = vec![0 as c_char; 64];
        assert_eq!(stuffed_decode(m.0, ids.as_ptr(), k, buf.as_mut_ptr(), 3, &mut k), StuffedStatus::Size);
        assert_eq!(k, 18);
        assert_eq!(stuffed_decode(m.0, ids.as_ptr(), need, buf.as_mut_ptr(), 64, &mut k), StuffedStatus::Ok);
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), "Hello world, hello");
        // Greedy: each token is the argmax of the logits after the tokens before it.
        let prompt = [ids[0] % v as u32, 3, 4];
        let mut state = vec![0f32; n];
        let mut out = [0u32; 4];
        let st = stuffed_generate(m.0, state.as_mut_ptr(), n, prompt.as_ptr(), 3, 4, -1, out.as_mut_ptr(), &mut k);
        assert_eq!((st, k), (StuffedStatus::Ok, 4), "{}", last_error());
        let mut seq = prompt.to_vec();
        for &t in &out {
            let mut z = vec![0f32; n];
            let mut last = vec![0f32; v];
            stuffed_forward(m.0, z.as_mut_ptr(), n, seq.as_ptr(), seq.len(), last.as_mut_ptr(), v, 0);
            let real = &last[..i.real_vocab];
            let best = real.iter().enumerate().fold(0, |b, (j, &x)| if x > real[b] { j } else { b });
            assert_eq!(t as usize, best);
            seq.push(t);
        }
        // A stop id ends the decode before it.
        let mut z = vec![0f32; n];
        let st =
            stuffed_generate(m.0, z.as_mut_ptr(), n, prompt.as_ptr(), 3, 4, out[1] as i64, out.as_mut_ptr(), &mut k);
        assert_eq!((st, k), (StuffedStatus::Ok, 1));

        // --forget strings: the CLI's messages; a window grows the state; reset needs a stream.
        let bad = CString::new("window:r=x").unwrap();
        assert_eq!(stuffed_set_forget(m.0, bad.as_ptr()), StuffedStatus::Failed);
        assert!(last_error().starts_with("--forget window:r=x: r:"), "{}", last_error());
        let w = CString::new("window:r=16").unwrap();
        assert_eq!(stuffed_set_forget(m.0, w.as_ptr()), StuffedStatus::Ok, "{}", last_error());
        assert!(stuffed_state_len(m.0) > n);
        let r = CString::new("reset:every=2").unwrap();
        assert_eq!(stuffed_set_forget(m.0, r.as_ptr()), StuffedStatus::Ok, "{}", last_error());
        let n2 = stuffed_state_len(m.0);
        let mut s2 = vec![0f32; n2];
        let mut last = vec![0f32; v];
        let st = stuffed_forward(m.0, s2.as_mut_ptr(), n2, prompt.as_ptr(), 3, last.as_mut_ptr(), v, 0);
        assert_eq!(st, StuffedStatus::Failed);
        assert!(last_error().starts_with("--forget reset:every=2: acts between calls"), "{}", last_error());
        let mut nll = [0f32; 2];
        assert_eq!(stuffed_nll_stream(m.0, prompt.as_ptr(), 3, 512, nll.as_mut_ptr(), 2), StuffedStatus::Ok);
    }
}

/// The library installs no signal handlers, even through an evaluator's run: SIGINT's disposition
/// is what the process started with (SIG_DFL, or SIG_IGN where a non-interactive shell started it
/// in the background).
#[test]
fn no_signal_handlers() {
    let sigint = || unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, null(), &mut old);
        old.sa_sigaction
    };
    let before = sigint();
    assert!(before == libc::SIG_DFL || before == libc::SIG_IGN, "SIGINT already handled ({before:#x})");
    let m = open("mamba2_hf_g1_untied");
    let n = unsafe { stuffed_state_len(m.0) };
    let mut s = vec![0f32; n];
    let mut nll = [0f32; 1];
    unsafe { stuffed_nll(m.0, s.as_mut_ptr(), n, [1u32].as_ptr(), [2u32].as_ptr(), 1, nll.as_mut_ptr()) };
    assert_eq!(sigint(), before);
}

/// An embedder's thread with a small stack (32 KiB; musl's default is 128 KiB) runs every call at
/// every kernel level this CPU has, on one thread and on two (it passes with the library's stack
/// growth off too: the kernels' panels are on the heap). An overflow aborts the process, so each level
/// runs in a child process (this test again, told which by the environment).
#[test]
fn calls_run_on_a_small_thread_stack() {
    const CHILD: &str = "STUFFED_TEST_SMALL_STACK";
    if let Ok(threads) = std::env::var(CHILD) {
        small_stack_child(threads.parse().unwrap());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for level in stuffed_host::exec::levels_here() {
        for threads in ["1", "2"] {
            let out = std::process::Command::new(&exe)
                .args(["tests::calls_run_on_a_small_thread_stack", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, threads)
                .env("STUFFED_SIMD", level.name())
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{} on {threads} thread(s): {:?}\n{said}", level.name(), out.status);
            assert!(said.contains(&format!("ran {}", level.name())), "{said}");
            eprintln!("small stack: {} on {threads} thread(s) ran", level.name());
        }
    }
}

/// In the child: forward (every position's logits), NLL, the whole stream's NLL and greedy decoding
/// of 64 tokens (enough rows for the packed-panel kernels) on bf16 and f32 models, from a thread
/// with a 32 KiB stack.
fn small_stack_child(threads: usize) {
    assert_eq!(stuffed_set_threads(threads), StuffedStatus::Ok);
    let level = stuffed_host::exec::default_simd(stuffed_host::exec::matmul_mode());
    for name in ["mamba2_hf_bf16", "rwkv6_tiny_bf16", "gla_tiny"] {
        let m = open(name);
        let i = info(&m);
        let ptr = m.0 as usize;
        let ran = std::thread::Builder::new().stack_size(32 << 10).spawn(move || {
            let m = ptr as *const StuffedModel;
            let (n, v) = (i.state_floats, i.vocab_rows);
            let ids: Vec<u32> = (0..64).map(|k| (k * 7 + 3) % 60).collect();
            let mut state = vec![0f32; n];
            let mut logits = vec![0f32; ids.len() * v];
            let mut nll = vec![0f32; ids.len()];
            let mut stream = vec![0f32; ids.len() - 1];
            let (mut out, mut got) = ([0u32; 4], 0usize);
            unsafe {
                let len = ids.len();
                let all = stuffed_forward(m, state.as_mut_ptr(), n, ids.as_ptr(), len, logits.as_mut_ptr(), len * v, 1);
                let one = stuffed_nll(m, state.as_mut_ptr(), n, ids.as_ptr(), ids.as_ptr(), len, nll.as_mut_ptr());
                let whole = stuffed_nll_stream(m, ids.as_ptr(), len, 512, stream.as_mut_ptr(), len - 1);
                let gen =
                    stuffed_generate(m, state.as_mut_ptr(), n, ids.as_ptr(), len, 4, -1, out.as_mut_ptr(), &mut got);
                [all, one, whole, gen]
            }
        });
        let ran = ran.unwrap().join().unwrap();
        assert_eq!(ran, [StuffedStatus::Ok; 4], "{name}: {}", last_error());
    }
    println!("ran {}", level.name());
}

/// One handle, four threads calling at once, each on its own stream and state (what the header
/// promises): every call gives bit for bit the logits and state of the same call made alone,
/// whether it found the pool's workers free, shared them or waited for them.
#[test]
fn one_handle_serves_several_threads_at_once() {
    for name in ["mamba2_hf_bf16", "rwkv6_tiny_bf16"] {
        let m = open(name);
        let i = info(&m);
        let (n, v) = (i.state_floats, i.vocab_rows);
        let stream = |s: u32| -> Vec<u32> { (0..48).map(|k| (k * 7 + 3 * s + 1) % 60).collect() };
        let forward = |m: *const StuffedModel, ids: &[u32]| {
            let mut state = vec![0f32; n];
            let mut logits = vec![0f32; ids.len() * v];
            let st = unsafe {
                stuffed_forward(m, state.as_mut_ptr(), n, ids.as_ptr(), ids.len(), logits.as_mut_ptr(), logits.len(), 1)
            };
            assert_eq!(st, StuffedStatus::Ok, "{name}: {}", last_error());
            (logits, state)
        };
        let alone: Vec<_> = (0..4).map(|s| forward(m.0, &stream(s))).collect();
        let ptr = m.0 as usize;
        std::thread::scope(|sc| {
            for (s, want) in alone.iter().enumerate() {
                let ids = stream(s as u32);
                sc.spawn(move || {
                    for round in 0..12 {
                        let got = forward(ptr as *const StuffedModel, &ids);
                        assert!(got == *want, "{name}: thread {s}, round {round}: not the lone call's numbers");
                    }
                });
            }
        });
    }
}

/// `stuffed_state_zero` writes the state a stream starts from: zeros for most models, a state-tuned
/// RWKV's own (its `att.time_state`, transposed into S) for one, and the first logits from it
/// differ from those from a zeroed array.
#[test]
fn state_zero_is_a_tuned_models_start() {
    for (case, tuned) in [("rwkv6_tiny", false), ("rwkv6_time_state", true)] {
        let m = open(case);
        let n = unsafe { stuffed_state_len(m.0) };
        let mut st = vec![7f32; n];
        assert_eq!(unsafe { stuffed_state_zero(m.0, st.as_mut_ptr(), n) }, StuffedStatus::Ok);
        assert_eq!(st.iter().any(|&x| x != 0.0), tuned, "{case}");
        let v = info(&m).vocab_rows;
        let (ids, mut a, mut b) = ([1u32, 2], vec![0f32; v], vec![0f32; v]);
        let mut zeros = vec![0f32; n];
        unsafe {
            assert_eq!(
                stuffed_forward(m.0, st.as_mut_ptr(), n, ids.as_ptr(), 2, a.as_mut_ptr(), v, 0),
                StuffedStatus::Ok
            );
            assert_eq!(
                stuffed_forward(m.0, zeros.as_mut_ptr(), n, ids.as_ptr(), 2, b.as_mut_ptr(), v, 0),
                StuffedStatus::Ok
            );
        }
        assert_eq!(a != b, tuned, "{case}");
    }
}

/// `stuffed_open_with_state` starts every stream from the state file's states: the start it writes
/// is the one the same states merged into a model give (the state holds no other weight), null opens
/// plain, and a file another model's shape is refused naming it.
#[test]
fn a_state_file_beside_the_model_is_its_start() {
    let start = |m: &Open| {
        let n = unsafe { stuffed_state_len(m.0) };
        let mut st = vec![7f32; n];
        assert_eq!(unsafe { stuffed_state_zero(m.0, st.as_mut_ptr(), n) }, StuffedStatus::Ok);
        st
    };
    let with = |state: *const c_char| {
        let mut m = null_mut();
        let st = unsafe { stuffed_open_with_state(golden("rwkv6_bf16_m3_d5").as_ptr(), state, &mut m) };
        (st, Open(m))
    };
    let file = golden("rwkv6_time_state_file/state.pth");
    let (st, m) = with(file.as_ptr());
    assert_eq!(st, StuffedStatus::Ok, "{}", last_error());
    assert_eq!(start(&m), start(&open("rwkv6_time_state")));
    let (st, plain) = with(null());
    assert_eq!(st, StuffedStatus::Ok, "{}", last_error());
    assert!(start(&plain).iter().all(|&x| x == 0.0));
    let (st, _) = with(golden("rwkv7_time_state_file/state.pth").as_ptr());
    assert_ne!(st, StuffedStatus::Ok);
    let e = last_error();
    assert!(e.contains("rwkv7_time_state_file/state.pth") && e.contains("has shape"), "{e}");
}
