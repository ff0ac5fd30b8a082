# Does compute-sanitizer's initcheck see cuBLAS's writes? (tools/gpu_run.sh sanitize runs it on the GPU machine:
#   compute-sanitizer --tool initcheck python3 tools/initcheck_probe.py M N K)
# Each case copies a buffer back to the host; initcheck flags a copy whose source it thinks unwritten.
import ctypes, glob, sys, struct
def lib(pat):
    for p in sorted(glob.glob(pat)):
        try: return ctypes.CDLL(p)
        except OSError: pass
    sys.exit("no " + pat)
rt = lib("/usr/local/cuda/lib64/libcudart.so*")
bl = lib("/usr/local/cuda/lib64/libcublas.so*")
def buf(n):
    p = ctypes.c_void_p(); assert rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(n)) == 0; return p
def up(p, data):
    assert rt.cudaMemcpy(p, data, ctypes.c_size_t(len(data)), 1) == 0
def down(p, n, tag):
    print("== copy back:", tag, flush=True)
    h = ctypes.create_string_buffer(n); r = rt.cudaMemcpy(h, p, ctypes.c_size_t(n), 2); rt.cudaDeviceSynchronize()
    print("   rc", r, flush=True)
m, n, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
h = ctypes.c_void_p(); assert bl.cublasCreate_v2(ctypes.byref(h)) == 0
A = buf(m*k*4); B = buf(k*n*4); up(A, struct.pack(f"{m*k}f", *([0.5]*(m*k)))); up(B, struct.pack(f"{k*n}f", *([0.25]*(k*n))))
C = buf(m*n*4); U = buf(64)
down(U, 64, "control: never written (expect a report)")
one = ctypes.c_float(1.0); zero = ctypes.c_float(0.0)
r = bl.cublasSgemm_v2(h, 1, 0, m, n, k, ctypes.byref(one), A, k, B, k, ctypes.byref(zero), C, m)
print("sgemm rc", r, flush=True); rt.cudaDeviceSynchronize()
down(C, m*n*4, f"C of cublasSgemm {m}x{n}x{k} (a report here is a false positive)")
# bf16 in, f32 out, f32 compute (CUDA_R_16BF = 14, CUDA_R_32F = 0, CUBLAS_COMPUTE_32F = 68)
A2 = buf(m*k*2); B2 = buf(k*n*2); up(A2, b"\x00\x3f"*(m*k)); up(B2, b"\x80\x3e"*(k*n)); C2 = buf(m*n*4)
r = bl.cublasGemmEx(h, 1, 0, m, n, k, ctypes.byref(one), A2, 14, k, B2, 14, k, ctypes.byref(zero), C2, 0, m, 68, 0)
print("gemmex bf16 rc", r, flush=True); rt.cudaDeviceSynchronize()
down(C2, m*n*4, f"C of cublasGemmEx bf16 {m}x{n}x{k}")
