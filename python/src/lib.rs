//! `stuffed._stuffed`: the native half of the Python package (`python/stuffed/__init__.py` is the
//! other). A thin layer over `stuffed::embed` (the C ABI's layer too) and the CLI's own command
//! flow (`stuffed::cli`), so Python and the CLI run one code path. Every call that computes releases
//! the GIL; states and outputs are numpy arrays written in place (no copies across the boundary).
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::path::PathBuf;
use stuffed_host::embed::{Error, Handle as Inner, Kind};

fn py_err(e: Error) -> PyErr {
    match e.kind {
        Kind::Size | Kind::Range => PyValueError::new_err(e.message),
        Kind::Failed => PyRuntimeError::new_err(e.message),
    }
}

fn contiguous<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{what}: give a contiguous 1-D array")))
}

/// An open model: what `stuffed --model PATH` opens (a directory, a checkpoint file, or
/// `owner/name[@rev]` from the local Hugging Face cache).
#[pyclass(frozen, module = "stuffed._stuffed")]
struct Handle {
    inner: Inner,
}

#[pymethods]
impl Handle {
    #[new]
    #[pyo3(signature = (path, state_file=None))]
    fn new(py: Python<'_>, path: PathBuf, state_file: Option<PathBuf>) -> PyResult<Handle> {
        py.detach(|| Inner::open_with_state(&path, state_file.as_deref())).map(|inner| Handle { inner }).map_err(py_err)
    }

    /// `stuffed info --json`'s facts, as JSON.
    fn info_json(&self) -> String {
        self.inner.info_json()
    }

    /// (family, d_model, n_layer, vocab_rows, real_vocab, state_len, paper_state_size)
    fn facts(&self) -> (String, usize, usize, usize, usize, usize, usize) {
        let f = self.inner.facts();
        (f.family, f.d_model, f.n_layer, f.vocab_rows, f.real_vocab, f.state_len, f.paper_state_size)
    }

    fn state_len(&self) -> usize {
        self.inner.state_len()
    }

    /// Writes the state a stream starts from into `state` (zeros, or a state-tuned RWKV's own).
    fn initial_state(&self, mut state: PyReadwriteArray1<'_, f32>) -> PyResult<()> {
        let st = state.as_slice_mut().map_err(|_| PyValueError::new_err("state: give a contiguous float32 array"))?;
        self.inner.initial_state(st).map_err(py_err)
    }

    fn set_forget(&self, py: Python<'_>, spec: &str) -> PyResult<()> {
        py.detach(|| self.inner.set_forget(spec)).map_err(py_err)
    }

    fn set_chunk(&self, chunk: usize) -> PyResult<()> {
        self.inner.set_chunk(chunk).map_err(py_err)
    }

    fn chunk(&self) -> usize {
        self.inner.chunk()
    }

    /// Logits `(n, vocab_rows)` of every position (`all`), else `(vocab_rows,)` of the last, from
    /// `state` (float32, updated in place).
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: PyReadonlyArray1<'py, u32>,
        mut state: PyReadwriteArray1<'py, f32>,
        all: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = contiguous(&tokens, "tokens")?;
        let st = state.as_slice_mut().map_err(|_| PyValueError::new_err("state: give a contiguous float32 array"))?;
        let v = self.inner.facts().vocab_rows;
        if all {
            let out = PyArray2::<f32>::zeros(py, [ids.len(), v], false);
            // SAFETY: a fresh array no one else holds.
            let dst = unsafe { out.as_slice_mut() }.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            py.detach(|| self.inner.forward(st, ids, dst, true)).map_err(py_err)?;
            Ok(out.into_any())
        } else {
            let out = PyArray1::<f32>::zeros(py, v, false);
            // SAFETY: a fresh array no one else holds.
            let dst = unsafe { out.as_slice_mut() }.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            py.detach(|| self.inner.forward(st, ids, dst, false)).map_err(py_err)?;
            Ok(out.into_any())
        }
    }

    /// NLL of `targets[i]` after `tokens[..=i]`, from `state` (updated in place).
    fn nll_of<'py>(
        &self,
        py: Python<'py>,
        tokens: PyReadonlyArray1<'py, u32>,
        targets: PyReadonlyArray1<'py, u32>,
        mut state: PyReadwriteArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let (ids, tg) = (contiguous(&tokens, "tokens")?, contiguous(&targets, "targets")?);
        let st = state.as_slice_mut().map_err(|_| PyValueError::new_err("state: give a contiguous float32 array"))?;
        let out = PyArray1::<f32>::zeros(py, ids.len(), false);
        // SAFETY: a fresh array no one else holds.
        let dst = unsafe { out.as_slice_mut() }.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        py.detach(|| self.inner.nll(st, ids, tg, dst)).map_err(py_err)?;
        Ok(out)
    }

    /// Per-position NLL of a stream from the zero state (`ppl --nll-out`'s numbers), `n − 1` floats.
    fn nll_stream<'py>(
        &self,
        py: Python<'py>,
        tokens: PyReadonlyArray1<'py, u32>,
        chunk: usize,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let ids = contiguous(&tokens, "tokens")?;
        let out = PyArray1::<f32>::zeros(py, ids.len().saturating_sub(1), false);
        // SAFETY: a fresh array no one else holds.
        let dst = unsafe { out.as_slice_mut() }.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        py.detach(|| self.inner.nll_stream(ids, chunk, dst)).map_err(py_err)?;
        Ok(out)
    }

    /// Greedy tokens after `prompt` from `state` (updated), ending before `stop` (if any).
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: PyReadonlyArray1<'py, u32>,
        mut state: PyReadwriteArray1<'py, f32>,
        max_new: usize,
        stop: Option<u32>,
    ) -> PyResult<Vec<u32>> {
        let ids = contiguous(&prompt, "prompt")?;
        let st = state.as_slice_mut().map_err(|_| PyValueError::new_err("state: give a contiguous float32 array"))?;
        let mut out = Vec::with_capacity(max_new);
        py.detach(|| {
            self.inner.greedy(st, ids, max_new, &mut |t| {
                if Some(t) == stop {
                    return false;
                }
                out.push(t);
                true
            })
        })
        .map_err(py_err)?;
        Ok(out)
    }

    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let ids = py.detach(|| self.inner.encode(text)).map_err(py_err)?;
        Ok(PyArray1::from_vec(py, ids))
    }

    fn decode(&self, py: Python<'_>, ids: PyReadonlyArray1<'_, u32>) -> PyResult<String> {
        let v = contiguous(&ids, "ids")?;
        py.detach(|| self.inner.decode(v)).map_err(py_err)
    }

    fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_id(token)
    }
}

/// Runs a `stuffed` command line (`["ppl", "--model", …]`) through the CLI's own flow, the GIL
/// released; no signal handlers are installed. Its summary lines go to stdout, as the CLI's.
#[pyfunction]
fn run_cli(py: Python<'_>, args: Vec<String>) -> PyResult<()> {
    py.detach(|| {
        let cli = stuffed_host::cli::parse_from(std::iter::once("stuffed".to_string()).chain(args))?;
        stuffed_host::cli::run(cli)
    })
    .map_err(|e| PyRuntimeError::new_err(format!("{e:#}").replace('\n', " ")))
}

#[pymodule]
fn _stuffed(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Handle>()?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    Ok(())
}
