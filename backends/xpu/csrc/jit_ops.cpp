// First-use compilation on XPU (opt-in: KVDISPATCH_XPU_JIT=1): a small torch extension, compiled
// by the host C++ compiler (g++: no oneAPI needed) against the headers of the intel-sycl-rt wheel
// that torch's XPU builds depend on, that compiles kernel sources with DPC++'s run-time compiler
// (libsycl-jit, from the same wheel) for the context of torch's XPU queue and launches them on
// that queue. The same kernel sources and launch plans as the AOT build and the CPU lane
// (kernels.py); it serves instantiations the AOT table lacks, or installs without an AOT build.
//
// Arguments arrive as in cpu_lane/shim.cpp: a kind per kernel parameter (pointer, int64, int32,
// float) plus the values split by kind, in parameter order.
#include <c10/xpu/XPUStream.h>
#include <torch/extension.h>

#include <sycl/sycl.hpp>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace syclex = sycl::ext::oneapi::experimental;
using exe_bundle = sycl::kernel_bundle<sycl::bundle_state::executable>;

namespace {

struct Compiled {
  exe_bundle bundle;  // keeps the kernel's device image alive
  sycl::kernel kernel;
};

std::mutex g_mutex;
std::map<std::pair<int64_t, std::string>, std::shared_ptr<Compiled>> g_kernels;

std::shared_ptr<Compiled> find(int64_t device, const std::string &name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_kernels.find({device, name});
  return it == g_kernels.end() ? nullptr : it->second;
}

}  // namespace

// Compiles `source` for the context of torch's current queue on `device` and keeps kernel `name`;
// returns the compiler log. Raises (RuntimeError) with the log when the compiler rejects it.
std::string build(int64_t device, const std::string &source, const std::vector<std::string> &options,
                  const std::string &name) {
  if (find(device, name)) return "";
  sycl::queue &q = c10::xpu::getCurrentXPUStream(c10::DeviceIndex(device)).queue();
  std::string log;
  try {
    auto src = syclex::create_kernel_bundle_from_source(q.get_context(), syclex::source_language::sycl, source);
    auto exe = syclex::build(src, syclex::properties{syclex::build_options{options}, syclex::save_log{&log}});
    auto k = exe.ext_oneapi_get_kernel(name);
    auto c = std::make_shared<Compiled>(Compiled{std::move(exe), std::move(k)});
    std::lock_guard<std::mutex> lock(g_mutex);
    g_kernels.emplace(std::make_pair(device, name), std::move(c));
  } catch (const sycl::exception &e) {
    TORCH_CHECK(false, "kvdispatch XPU first-use compile of ", name, " failed: ", e.what(), "\n", log);
  }
  return log;
}

void launch(int64_t device, const std::string &name, const std::vector<std::optional<at::Tensor>> &tensors,
            const std::vector<int64_t> &kinds, const std::vector<int64_t> &ints,
            const std::vector<double> &floats, int64_t groups, int64_t local) {
  auto c = find(device, name);
  TORCH_CHECK(c, "kvdispatch XPU: kernel ", name, " was not built for device ", device);
  if (groups <= 0) return;
  sycl::queue &q = c10::xpu::getCurrentXPUStream(c10::DeviceIndex(device)).queue();
  q.submit([&](sycl::handler &h) {
    size_t ti = 0, ii = 0, fi = 0;
    for (size_t i = 0; i < kinds.size(); i++) {
      switch (kinds[i]) {
        case 0: {
          TORCH_CHECK(ti < tensors.size(), "kvdispatch XPU launch: too few tensors");
          const auto &t = tensors[ti++];
          h.set_arg(int(i), t.has_value() ? t->data_ptr() : static_cast<void *>(nullptr));
          break;
        }
        case 1: TORCH_CHECK(ii < ints.size(), "too few ints"); h.set_arg(int(i), int64_t(ints[ii++])); break;
        case 2: TORCH_CHECK(ii < ints.size(), "too few ints"); h.set_arg(int(i), int32_t(ints[ii++])); break;
        case 3: TORCH_CHECK(fi < floats.size(), "too few floats"); h.set_arg(int(i), float(floats[fi++])); break;
        default: TORCH_CHECK(false, "kvdispatch XPU launch: unknown argument kind ", kinds[i]);
      }
    }
    TORCH_CHECK(ti == tensors.size() && ii == ints.size() && fi == floats.size(),
                "kvdispatch XPU launch(", name, "): argument lists do not match the kinds");
    h.parallel_for(sycl::nd_range<1>{size_t(groups * local), size_t(local)}, c->kernel);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build", &build, "compile a kernel source for torch's XPU context");
  m.def("launch", &launch, "launch a compiled kernel on torch's current XPU queue");
}
