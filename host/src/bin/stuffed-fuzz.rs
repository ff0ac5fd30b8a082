//! `stuffed-fuzz`: runs the fuzz targets of `stuffed::fuzz` in child processes, so that an abort, a
//! hang or a runaway allocation fails a case instead of the harness.
//!
//! ```text
//! stuffed-fuzz run [--cases N [--cases-of T=N,…] | --minutes M] [--jobs 2] [--state FILE]
//!                  [--targets a,b] [--log FILE] [--timeout-s 20] [--mem-mb 3072] [--chunk 250]
//!                  [--keep DIR]
//! stuffed-fuzz case TARGET N [--dump FILE]     one case in this process
//! stuffed-fuzz case TARGET --input FILE       a kept failing input (see --keep) in this process
//! stuffed-fuzz seeds TARGET                    the unmutated seeds must parse
//! stuffed-fuzz list
//! stuffed-fuzz worker TARGET FROM COUNT        (run's child: prints "case T N" before each case)
//! ```
//! A worker runs cases `FROM..FROM+COUNT` under RLIMIT_AS (`--mem-mb`, 3072) and prints each case's
//! number before running it; the parent kills it when a case takes longer than `--timeout-s` (20),
//! reports the case that died (panic, abort, signal, hang) and starts a new worker after it. With
//! `--state`, the next case of each target is read at start and written after every chunk: a run
//! stopped at any moment resumes where it was. With `--keep DIR`, each failing case's input is kept
//! as `DIR/TARGET-N.bin` (a read-back target's seeds hold times and paths of the process that made
//! them, so its case numbers alone do not reproduce it in another process).
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use stuffed::fuzz;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("worker") => worker(&args[1..]),
        Some("case") => case(&args[1..]),
        Some("seeds") => seeds(&args[1..]),
        Some("list") => {
            fuzz::targets().iter().for_each(|t| println!("{}", t.name));
            Ok(())
        }
        Some("run") => run(&args[1..]),
        _ => Err(anyhow!("usage: stuffed-fuzz run|case|seeds|list|worker … (see host/src/bin/stuffed-fuzz.rs)")),
    };
    fuzz::cleanup();
    if let Err(e) = r {
        eprintln!("stuffed-fuzz: error: {e:#}");
        std::process::exit(1);
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    flag(args, name).map_or(Ok(default), |v| v.parse().map_err(|_| anyhow!("{name} {v}: not a number")))
}

fn load(name: &str) -> Result<(fuzz::Target, Vec<Vec<u8>>)> {
    let t = fuzz::select(name)?;
    let seeds = (t.seeds)().with_context(|| format!("{name}: seeds"))?;
    if seeds.is_empty() {
        bail!("{name}: no seeds");
    }
    Ok((t, seeds))
}

fn worker(args: &[String]) -> Result<()> {
    let [name, from, count, ..] = args else { bail!("worker TARGET FROM COUNT") };
    let (from, count): (u64, u64) = (from.parse()?, count.parse()?);
    let mem_mb: u64 = num(args, "--mem-mb", 3072)?;
    let lim = libc::rlimit { rlim_cur: mem_mb << 20, rlim_max: mem_mb << 20 };
    // SAFETY: sets this process's own address-space limit from a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
        bail!("setrlimit failed");
    }
    let (t, seeds) = load(name)?;
    let keep = flag(args, "--keep").map(PathBuf::from);
    let mut out = std::io::stdout().lock();
    let mut ok = 0;
    for n in from..from + count {
        writeln!(out, "case {name} {n}")?;
        out.flush()?;
        if let Some(k) = &keep {
            // Where the parent finds the input of a case that kills this worker.
            std::fs::write(current_input(k, name, std::process::id()), fuzz::case_input(&t, &seeds, n))?;
        }
        match fuzz::run_case(&t, &seeds, n) {
            Ok(r) => ok += u64::from(r.is_ok()),
            Err(e) => {
                let kept = match &keep {
                    Some(k) => kept_input(k, name, n, std::process::id()),
                    None => String::new(),
                };
                writeln!(out, "FAIL {name} {n} {}{kept}", format!("{e:#}").replace('\n', " "))?
            }
        }
    }
    writeln!(out, "ok {ok}")?;
    writeln!(out, "done")?;
    Ok(())
}

/// The file a worker writes each case's input to before running it.
fn current_input(keep: &std::path::Path, name: &str, pid: u32) -> PathBuf {
    keep.join(format!("{name}.current.{pid}"))
}

/// Keeps worker `pid`'s current input as the input of failing case `n`; says where, for the report.
fn kept_input(keep: &std::path::Path, name: &str, n: u64, pid: u32) -> String {
    let to = keep.join(format!("{name}-{n}.bin"));
    match std::fs::rename(current_input(keep, name, pid), &to) {
        Ok(()) => format!(" (input kept: stuffed-fuzz case {name} --input {})", to.display()),
        Err(_) => String::new(),
    }
}

fn case(args: &[String]) -> Result<()> {
    if let (Some(name), Some(file)) = (args.first(), flag(args, "--input")) {
        let t = fuzz::select(name)?;
        let input = std::fs::read(file).with_context(|| format!("{file}: cannot read"))?;
        let r = fuzz::parse_caught(&t, &input)?;
        println!("{name} {file}: {}", r.map_or_else(|e| format!("error: {e:#}"), |_| "ok".into()));
        return Ok(());
    }
    let [name, n, ..] = args else { bail!("case TARGET N [--dump FILE] | case TARGET --input FILE") };
    let (t, seeds) = load(name)?;
    let n: u64 = n.parse()?;
    if let Some(p) = flag(args, "--dump") {
        std::fs::write(p, fuzz::case_input(&t, &seeds, n))?;
    }
    match fuzz::run_case(&t, &seeds, n) {
        Ok(r) => println!("{name} {n}: {}", r.map_or_else(|e| format!("error: {e:#}"), |_| "ok".into())),
        Err(e) => bail!("{name} {n}: {e:#}"),
    }
    Ok(())
}

fn seeds(args: &[String]) -> Result<()> {
    let [name, ..] = args else { bail!("seeds TARGET") };
    let (t, seeds) = load(name)?;
    for (i, s) in seeds.iter().enumerate() {
        (t.parse)(s).with_context(|| format!("{name}: seed {i} does not parse"))?;
    }
    println!("{name}: {} seeds parse", seeds.len());
    Ok(())
}

/// What became of one target in a run.
#[derive(Default)]
struct Tally {
    first: u64,
    next: u64,
    /// Cases the parser accepted (the rest it refused with an error).
    accepted: u64,
    failures: Vec<String>,
}

fn run(args: &[String]) -> Result<()> {
    let cases: Option<u64> = flag(args, "--cases").map(str::parse).transpose()?;
    let minutes: Option<f64> = flag(args, "--minutes").map(str::parse).transpose()?;
    if cases.is_none() == minutes.is_none() {
        bail!("run: give --cases N or --minutes M (per target)");
    }
    // Per-target case counts overriding --cases: `tokenizer-json=60,ppl-results=100`.
    let mut cases_of = BTreeMap::new();
    for kv in flag(args, "--cases-of").unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--cases-of {kv}: expected TARGET=N"))?;
        cases_of.insert(k.to_string(), v.parse::<u64>()?);
    }
    let jobs: usize = num(args, "--jobs", 2)?;
    let chunk: u64 = num(args, "--chunk", 250)?;
    let timeout = Duration::from_secs_f64(num(args, "--timeout-s", 20.0)?);
    let mem_mb: u64 = num(args, "--mem-mb", 3072)?;
    let state_path = flag(args, "--state").map(PathBuf::from);
    let log = flag(args, "--log").map(PathBuf::from);
    let keep = flag(args, "--keep").map(PathBuf::from);
    if let Some(k) = &keep {
        std::fs::create_dir_all(k).with_context(|| format!("{}: cannot create", k.display()))?;
    }
    let names: Vec<String> = match flag(args, "--targets") {
        Some(s) => s.split(',').map(String::from).collect(),
        None => fuzz::targets().iter().map(|t| t.name.to_string()).collect(),
    };
    let mut state: BTreeMap<String, u64> = match &state_path {
        Some(p) if p.exists() => serde_json::from_slice(&std::fs::read(p)?).context("fuzz state file")?,
        _ => BTreeMap::new(),
    };
    if cases.is_some() {
        state.clear(); // fixed cases from 0 (cargo test)
    }
    let state = Arc::new(Mutex::new(state));
    let queue = Arc::new(Mutex::new(names.clone()));
    let tallies = Arc::new(Mutex::new(BTreeMap::<String, Tally>::new()));
    let log = log.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)).transpose()?;
    let log = Arc::new(Mutex::new(log));
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..jobs.max(1) {
        let (queue, state, tallies, log, exe, state_path, cases_of, keep) = (
            queue.clone(),
            state.clone(),
            tallies.clone(),
            log.clone(),
            exe.clone(),
            state_path.clone(),
            cases_of.clone(),
            keep.clone(),
        );
        handles.push(std::thread::spawn(move || -> Result<()> {
            loop {
                let Some(name) = queue.lock().map_err(|_| anyhow!("lock"))?.pop() else { return Ok(()) };
                let first = state.lock().map_err(|_| anyhow!("lock"))?.get(&name).copied().unwrap_or(0);
                let mut tally = Tally { first, next: first, ..Tally::default() };
                let t0 = Instant::now();
                let cases = cases.map(|c| cases_of.get(&name).copied().unwrap_or(c));
                loop {
                    let left = match (cases, minutes) {
                        (Some(c), _) => (first + c).saturating_sub(tally.next),
                        (_, Some(m)) if t0.elapsed().as_secs_f64() < m * 60.0 => chunk,
                        _ => 0,
                    };
                    if left == 0 {
                        break;
                    }
                    let count = left.min(chunk);
                    let deadline = minutes.map(|m| t0 + Duration::from_secs_f64(m * 60.0));
                    let end = tally.next + count;
                    let limits = Limits { mem_mb, timeout, deadline, keep: keep.as_deref() };
                    let (reached, fail) =
                        chunk_run(&exe, &name, tally.next, count, &limits, &log, &mut tally.accepted)?;
                    tally.failures.extend(fail);
                    tally.next = reached.min(end);
                    let mut st = state.lock().map_err(|_| anyhow!("lock"))?;
                    st.insert(name.clone(), tally.next);
                    if let Some(p) = &state_path {
                        let tmp = p.with_extension("tmp");
                        std::fs::write(&tmp, serde_json::to_vec_pretty(&*st)?)?;
                        std::fs::rename(&tmp, p)?;
                    }
                }
                println!(
                    "{name}: cases {}..{} ({}, {} accepted) in {:.0} s, {} failures",
                    tally.first,
                    tally.next,
                    tally.next - tally.first,
                    tally.accepted,
                    t0.elapsed().as_secs_f64(),
                    tally.failures.len()
                );
                tallies.lock().map_err(|_| anyhow!("lock"))?.insert(name, tally);
            }
        }));
    }
    for h in handles {
        h.join().map_err(|_| anyhow!("a runner thread panicked"))??;
    }
    let tallies = tallies.lock().map_err(|_| anyhow!("lock"))?;
    let total: u64 = tallies.values().map(|t| t.next - t.first).sum();
    let failures: Vec<&String> = tallies.values().flat_map(|t| &t.failures).collect();
    println!("{total} cases over {} targets in {:.0} s", tallies.len(), started.elapsed().as_secs_f64());
    for f in &failures {
        println!("{f}");
    }
    if !failures.is_empty() {
        bail!("{} failing cases (reproduce: stuffed-fuzz case TARGET N, or --input the kept file)", failures.len());
    }
    Ok(())
}

/// What bounds a chunk's workers: memory, time per case, the run's end, where failing inputs go.
#[derive(Clone, Copy)]
struct Limits<'a> {
    mem_mb: u64,
    timeout: Duration,
    deadline: Option<Instant>,
    keep: Option<&'a std::path::Path>,
}

/// Runs cases `from..from+count` of `name` in workers, starting a new one after a case that kills
/// its worker or outlives `timeout`. Returns the case reached and the failures.
fn chunk_run(
    exe: &std::path::Path,
    name: &str,
    from: u64,
    count: u64,
    limits: &Limits,
    log: &Mutex<Option<std::fs::File>>,
    accepted: &mut u64,
) -> Result<(u64, Vec<String>)> {
    let Limits { mem_mb, timeout, deadline, keep } = *limits;
    let end = from + count;
    let (mut next, mut failures) = (from, Vec::new());
    while next < end {
        let mut cmd = Command::new(exe);
        cmd.args(["worker", name, &next.to_string(), &(end - next).to_string(), "--mem-mb", &mem_mb.to_string()]);
        if let Some(k) = keep {
            cmd.arg("--keep").arg(k);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let errs = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut current, mut done, mut hung) = (None::<u64>, false, false);
        loop {
            match rx.recv_timeout(timeout) {
                Ok(Ok(line)) => {
                    if let Some(f) = log.lock().ok().as_deref_mut().and_then(Option::as_mut) {
                        let _ = writeln!(f, "{line}");
                    }
                    if let Some(n) = line.strip_prefix("case ").and_then(|r| r.rsplit(' ').next()) {
                        current = n.parse().ok();
                        if deadline.is_some_and(|d| Instant::now() > d) {
                            let _ = child.kill();
                            break;
                        }
                    } else if line.starts_with("FAIL ") {
                        failures.push(line);
                    } else if let Some(k) = line.strip_prefix("ok ") {
                        *accepted += k.parse::<u64>().unwrap_or(0);
                    } else if line == "done" {
                        done = true;
                    }
                }
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
            }
        }
        let status = child.wait()?;
        // Stopped on time (not a failure): the case it was on runs again next time.
        let stopped = deadline.is_some_and(|d| Instant::now() > d) && !hung;
        let current = current.filter(|_| !(done && status.success()));
        let kept = match (keep, current) {
            (Some(k), Some(at)) if !stopped => kept_input(k, name, at, child.id()),
            _ => String::new(),
        };
        if let Some(k) = keep {
            let _ = std::fs::remove_file(current_input(k, name, child.id()));
        }
        // A worker killed or dead cannot remove its scratch directory (fuzz::scratch) itself.
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("stuffed-fuzz-{}", child.id())));
        let err = errs.join().unwrap_or_default();
        if done && status.success() {
            return Ok((end, failures));
        }
        let Some(at) = current else {
            bail!("{name}: worker failed before its first case ({status}): {}", err.trim());
        };
        if stopped {
            return Ok((at, failures));
        }
        let why = if hung { format!("no result within {} s", timeout.as_secs_f64()) } else { format!("{status}") };
        let telling = |l: &&str| ["panicked", "memory allocation", "fatal", "error"].iter().any(|w| l.contains(w));
        let last = err.lines().find(telling).or(err.lines().last()).unwrap_or("").trim().to_string();
        failures.push(format!("FAIL {name} {at} worker died: {why} {last}{kept}"));
        next = at + 1;
    }
    Ok((next, failures))
}
