// kernels_binding.cpp: the torch side of kernels.cu (module kimi_k2_kernels, built by setup.py).
//
// Checks every input with TORCH_CHECK (the message names the argument, what it got and what it needs), allocates
// the output and the workspace through torch's caching allocator, and launches kernels.cu's extern "C" launcher on
// the current CUDA stream. kernels.cu itself includes no torch header, so it compiles with plain nvcc anywhere.
// Python glue and the autograd wrapper (backward = the PyTorch reference) live in moe.py.
//
// Shapes: N tokens, K experts per token, E routed experts, D hidden, I expert intermediate size.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" {
int kimi_moe_pick_config(int64_t N, int K, int E);
size_t kimi_moe_workspace_bytes(int64_t N, int K, int E, int D, int I, int config);
int kimi_moe_forward(const void* x, const int32_t* idx, const float* weights, const void* gate, const void* up,
                     const void* down, void* out, int64_t N, int K, int E, int D, int I, void* workspace,
                     size_t workspace_bytes, int config, cudaStream_t stream);
}

namespace {

constexpr int64_t kMaxExperts = 1024;  // kernels.cu: one scan block of 1024 threads
const char* kConfigNames[] = {"auto", "small", "medium", "large"};

// align: 16 for the bf16 tensors kernels.cu copies in 16-byte chunks; weights are read one float at a time
void check_tensor(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t dims,
                  const torch::Tensor& x, int64_t align = 16) {
  TORCH_CHECK(t.is_cuda(), "moe_forward: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), "moe_forward: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, "moe_forward: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "moe_forward: ", name, " must have ", dims, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "moe_forward: ", name, " must be contiguous (call .contiguous()), got strides ",
              t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0, "moe_forward: ", name, " must be ", align,
              "-byte aligned (a fresh tensor is; a slice at an odd offset is not)");
}

}  // namespace

// x (N, D) bf16, idx (N, K) int32/int64, weights (N, K) fp32, gate/up (E, I, D) bf16, down (E, D, I) bf16
// -> out (N, D) bf16 = Σ_k weights[:, k] · down_e(silu(gate_e x) ⊙ up_e x), e = idx[:, k]
torch::Tensor moe_forward(torch::Tensor x, torch::Tensor idx, torch::Tensor weights, torch::Tensor gate,
                          torch::Tensor up, torch::Tensor down, int64_t config, bool poison) {
  check_tensor(x, "x", torch::kBFloat16, 2, x);
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 || idx.scalar_type() == torch::kInt32,
              "moe_forward: idx must be int64 or int32 expert ids, got ", idx.scalar_type());
  TORCH_CHECK(idx.is_cuda() && idx.device() == x.device(), "moe_forward: idx must be on ", x.device(), ", got ",
              idx.device());
  check_tensor(weights, "weights", torch::kFloat32, 2, x, /*align=*/4);
  check_tensor(gate, "gate", torch::kBFloat16, 3, x);
  check_tensor(up, "up", torch::kBFloat16, 3, x);
  check_tensor(down, "down", torch::kBFloat16, 3, x);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0), "moe_forward: idx must be (N, K) with N = ", x.size(0),
              ", got ", idx.sizes());
  const int64_t N = x.size(0), D = x.size(1), K = idx.size(1), E = gate.size(0), I = gate.size(1);
  TORCH_CHECK(weights.sizes() == idx.sizes(), "moe_forward: weights must have idx's shape ", idx.sizes(), ", got ",
              weights.sizes());
  TORCH_CHECK(K >= 1, "moe_forward: need at least one expert per token (K >= 1), got K = ", K);
  TORCH_CHECK(gate.size(2) == D, "moe_forward: gate must be (E, I, D) with D = ", D, ", got ", gate.sizes());
  TORCH_CHECK(up.sizes() == gate.sizes(), "moe_forward: up must have gate's shape ", gate.sizes(), ", got ",
              up.sizes());
  TORCH_CHECK(down.size(0) == E && down.size(1) == D && down.size(2) == I, "moe_forward: down must be (E, D, I) = (",
              E, ", ", D, ", ", I, "), got ", down.sizes());
  TORCH_CHECK(1 <= E && E <= kMaxExperts, "moe_forward: supports 1..", kMaxExperts, " experts, got E = ", E);
  TORCH_CHECK(D % 8 == 0 && I % 8 == 0, "moe_forward: needs D % 8 == 0 and I % 8 == 0 (16-byte rows), got D = ", D,
              ", I = ", I);
  // a zero width would launch an empty grid; kernels.cu indexes within a row with int
  TORCH_CHECK(0 < D && D < (int64_t(1) << 30) && 0 < I && I < (int64_t(1) << 30),
              "moe_forward: needs 0 < D, I < 2^30, got D = ", D, ", I = ", I);
  TORCH_CHECK(N * K < (int64_t(1) << 31) - 1, "moe_forward: N·K must fit in int32, got ", N * K);
  TORCH_CHECK(0 <= config && config <= 3, "moe_forward: config must be 0 (auto), 1 (small), 2 (medium) or 3 (large),",
              " got ", config);

  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({N, D}, x.options());
  if (N == 0) return out;
  // ids outside [0, E) are dropped by the kernels (no host sync to check them here); an int64 id outside the int32
  // range would wrap in this cast instead (the router never makes one)
  auto idx32 = idx.to(torch::kInt32).contiguous();  // (N, K)
  const size_t ws_bytes = kimi_moe_workspace_bytes(N, (int)K, (int)E, (int)D, (int)I, (int)config);
  auto workspace = torch::empty({(int64_t)ws_bytes}, x.options().dtype(torch::kUInt8));
  if (poison) workspace.fill_(0xFF);  // tests: 0xFF bytes are NaN in bf16 and fp32, so a row never written shows up
  const int err = kimi_moe_forward(x.data_ptr(), idx32.data_ptr<int32_t>(), weights.data_ptr<float>(),
                                   gate.data_ptr(), up.data_ptr(), down.data_ptr(), out.data_ptr(), N, (int)K, (int)E,
                                   (int)D, (int)I, workspace.data_ptr(), ws_bytes, (int)config,
                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "moe_forward: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

// The tile configuration kernels.cu would pick for these sizes (1 small, 2 medium, 3 large), and its name.
std::string pick_config(int64_t N, int64_t K, int64_t E) {
  return kConfigNames[kimi_moe_pick_config(N, (int)K, (int)E)];
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused routed-expert kernels for Kimi K2 (kernels.cu); reference: moe.moe_reference";
  m.def("moe_forward", &moe_forward,
        "Fused routed experts, forward only: x (N, D) bf16, idx (N, K) int, weights (N, K) fp32, gate/up (E, I, D) "
        "bf16, down (E, D, I) bf16 -> (N, D) bf16. config: 0 auto, 1 small, 2 medium, 3 large tiles. "
        "poison: fill the workspace with NaN first (tests: catches rows the kernels fail to write).",
        py::arg("x"), py::arg("idx"), py::arg("weights"), py::arg("gate"), py::arg("up"), py::arg("down"),
        py::arg("config") = 0, py::arg("poison") = false);
  m.def("pick_config", &pick_config, "Name of the tile configuration config=0 picks for N tokens, top-K, E experts",
        py::arg("N"), py::arg("K"), py::arg("E"));
}
