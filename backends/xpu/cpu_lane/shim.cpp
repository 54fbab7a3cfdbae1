// Host shim of the CPU test lane: compiles SYCL kernel sources at run time with DPC++'s kernel
// compiler (sycl_ext_oneapi_kernel_compiler, libsycl-jit) and launches them on Intel's OpenCL CPU
// device. Compiled by g++ against the intel-sycl-rt wheel's headers; loaded from Python by ctypes.
//
// The C interface is deliberately tiny (build a bundle, get a kernel, allocate USM, launch with
// typed scalar/pointer arguments) so that everything kernel-specific stays in the kernel sources
// and in Python. Every entry point catches C++ exceptions and returns their text: an exception
// crossing into ctypes would abort the Python process.
#include <sycl/sycl.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace syclex = sycl::ext::oneapi::experimental;
using exe_bundle = sycl::kernel_bundle<sycl::bundle_state::executable>;

namespace {

std::unique_ptr<sycl::queue> g_queue;

void put_error(char *err, size_t len, const std::string &msg) {
  if (err && len) {
    std::strncpy(err, msg.c_str(), len - 1);
    err[len - 1] = 0;
  }
}

template <class F> int guarded(char *err, size_t len, F &&f) {
  try {
    f();
    return 0;
  } catch (const sycl::exception &e) {
    put_error(err, len, std::string("sycl::exception: ") + e.what());
  } catch (const std::exception &e) {
    put_error(err, len, std::string("std::exception: ") + e.what());
  } catch (...) {
    put_error(err, len, "unknown C++ exception");
  }
  return -1;
}

}  // namespace

extern "C" {

// Opens an in-order queue on the CPU device; fills `device` with its name. 0 on success.
int kvx_init(char *device, size_t device_len, char *err, size_t err_len) {
  return guarded(err, err_len, [&] {
    if (!g_queue) {
      g_queue = std::make_unique<sycl::queue>(sycl::cpu_selector_v, sycl::property::queue::in_order{});
    }
    auto dev = g_queue->get_device();
    if (!dev.ext_oneapi_can_compile(syclex::source_language::sycl))
      throw std::runtime_error("the CPU device cannot compile SYCL source (libsycl-jit missing?)");
    put_error(device, device_len, dev.get_info<sycl::info::device::name>());
  });
}

// Compiles `source` (a whole translation unit) with the given compiler options; returns an opaque
// bundle handle in *out and the compiler's log (warnings, errors) in `log`.
int kvx_build(const char *source, const char **options, int num_options, void **out, char *log,
              size_t log_len, char *err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<std::string> opts(options, options + num_options);
    std::string build_log;
    auto src = syclex::create_kernel_bundle_from_source(g_queue->get_context(),
                                                        syclex::source_language::sycl, source);
    try {
      auto exe = syclex::build(src, syclex::properties{syclex::build_options{opts},
                                                        syclex::save_log{&build_log}});
      put_error(log, log_len, build_log);
      *out = new exe_bundle(std::move(exe));
    } catch (...) {
      put_error(log, log_len, build_log);
      throw;
    }
  });
}

void kvx_release_bundle(void *bundle) { delete static_cast<exe_bundle *>(bundle); }

// The kernel named `name` (an extern "C" free-function kernel) of a bundle.
int kvx_kernel(void *bundle, const char *name, void **out, char *err, size_t err_len) {
  return guarded(err, err_len, [&] {
    *out = new sycl::kernel(static_cast<exe_bundle *>(bundle)->ext_oneapi_get_kernel(name));
  });
}

void kvx_release_kernel(void *kernel) { delete static_cast<sycl::kernel *>(kernel); }

// USM shared memory: host-accessible, so Python copies tensors in and out with plain memmove.
int kvx_alloc(size_t bytes, void **out, char *err, size_t err_len) {
  return guarded(err, err_len, [&] {
    *out = sycl::malloc_shared(bytes ? bytes : 1, *g_queue);
    if (!*out) throw std::runtime_error("malloc_shared failed");
  });
}

void kvx_free(void *ptr) {
  if (ptr && g_queue) sycl::free(ptr, *g_queue);
}

// Argument kinds of kvx_launch: pointer, int64, int32, float32.
enum { ARG_PTR = 0, ARG_I64 = 1, ARG_I32 = 2, ARG_F32 = 3 };

// Launches a 1-D nd_range of `global` work-items in groups of `local` and waits; `kinds[i]` says
// how to read `values[i]` (a pointer to the argument's value).
int kvx_launch(void *kernel, size_t global, size_t local, int num_args, const int *kinds,
               const void *const *values, double *seconds, char *err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto &k = *static_cast<sycl::kernel *>(kernel);
    auto t0 = std::chrono::steady_clock::now();
    g_queue->submit([&](sycl::handler &h) {
      for (int i = 0; i < num_args; i++) {
        switch (kinds[i]) {
          case ARG_PTR: h.set_arg(i, *static_cast<void *const *>(values[i])); break;
          case ARG_I64: h.set_arg(i, *static_cast<const int64_t *>(values[i])); break;
          case ARG_I32: h.set_arg(i, *static_cast<const int32_t *>(values[i])); break;
          case ARG_F32: h.set_arg(i, *static_cast<const float *>(values[i])); break;
          default: throw std::runtime_error("kvx_launch: unknown argument kind");
        }
      }
      h.parallel_for(sycl::nd_range<1>{global, local}, k);
    }).wait_and_throw();
    if (seconds)
      *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
}

}  // extern "C"
