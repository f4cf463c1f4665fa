/*
 * A stand-in for the CUDA driver library (libcuda.so.1) on a build machine WITHOUT a GPU.
 *
 * TVM's libtvm_runtime_cuda.so links against libcuda.so.1. When it cannot be loaded, TVM's CUDA codegen
 * keeps the kernels as CUDA C source that every device must JIT-compile on load. With this stub (and
 * pip's libcudart.so.13) loaded first, libtvm_runtime_cuda.so loads, the CUDA module factory runs NVRTC
 * at build time and the exported library holds a cubin. No function here can reach a GPU: each driver
 * call fails with CUDA_ERROR_NO_DEVICE, so a process that tried to *run* CUDA code would fail loudly
 * instead of silently doing nothing.
 *
 * NEVER let a process that drives a real GPU see this file: pipeline/cuda/builder.py loads it only into the build
 * subprocess (pipeline/cuda/child.py), and only when no real libcuda.so.1 can be loaded.
 *
 * Built by pipeline/cuda/builder.py with: gcc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o libcuda.so.1 <this>
 * pipeline/cuda/builder.py appends a generic stub for any further cu* symbol a newer libtvm_runtime_cuda.so
 * needs, so that the soname's undefined symbols are always covered.
 */

typedef int CUresult;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NO_DEVICE 100

static const char stub_name[] = "CUDA_ERROR_NO_DEVICE";
static const char stub_text[] =
    "no CUDA device: this is the build-only libcuda.so.1 stub of tvm-remote-pipeline (pipeline/cuda/stub.c)";

/* The two error helpers fill in their out-parameter: callers print it. */
CUresult cuGetErrorName(CUresult error, const char **p_str) {
  (void)error;
  if (p_str) *p_str = stub_name;
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **p_str) {
  (void)error;
  if (p_str) *p_str = stub_text;
  return CUDA_SUCCESS;
}

/* Everything else TVM 0.27's libtvm_runtime_cuda.so imports from the driver: fail, touch nothing. */
#define TVMRP_NO_DEVICE(name) \
  CUresult name(void) { return CUDA_ERROR_NO_DEVICE; }

TVMRP_NO_DEVICE(cuDeviceGetName)
TVMRP_NO_DEVICE(cuFuncSetAttribute)
TVMRP_NO_DEVICE(cuLaunchKernelEx)
TVMRP_NO_DEVICE(cuModuleGetFunction)
TVMRP_NO_DEVICE(cuModuleLoadData)
TVMRP_NO_DEVICE(cuModuleUnload)
TVMRP_NO_DEVICE(cuTensorMapEncodeTiled)
