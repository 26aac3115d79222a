// Runs one kernel launch of kernels/*.cu on the CPU emulation (cuda_shim.h), for
// tests/cuda_emulated.rs:
//
//   driver DIR KERNEL GRID_X GRID_Y BLOCK_X ARG...
//
// with the kernel's arguments in order, each one of
//   in:FILE[+OFF]   a device buffer holding DIR/FILE; +OFF places it OFF bytes past a 16-byte
//                   boundary (an unaligned weight pointer)
//   out:FILE:BYTES  a device buffer of BYTES bytes, poisoned with 0xAB, saved to DIR/FILE after
//   inout:FILE      a device buffer holding DIR/FILE, saved back to it after (in-place kernels)
//   null            a null pointer (an optional buffer left out)
//   i:VALUE         an int
//   f:BITS          a float, as the hex bits of its IEEE pattern (no decimal round trip)
//
// Each buffer ends against an inaccessible page, so a kernel reading or writing past the end
// crashes (a buffer placed with +OFF may have up to 15 slack bytes before that page).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cuda_shim.h"
#include "quantize.cu"
#include "bitlinear_gemv.cu"
#include "bitlinear_gemm.cu"
#include "dequant.cu"
#include "rms_norm_quantize.cu"
#include "rope_kv.cu"
#include "attention.cu"
#include "argmax.cu"

namespace {

struct Arg {
  char kind = 0;        // 'b' buffer, 'i' int, 'f' float
  void* ptr = nullptr;  // buffers
  size_t bytes = 0;
  std::string out_file;  // output buffers
  int i = 0;
  float f = 0;
};
using Args = std::vector<Arg>;

// `bytes` at an address with the given remainder mod 16, as close to a guard page as possible.
void* guarded_alloc(size_t bytes, size_t misalign) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t data = (bytes + 16 + page - 1) / page * page;
  char* base = static_cast<char*>(
      mmap(nullptr, data + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED || mprotect(base + data, page, PROT_NONE) != 0) shim_fail("mmap");
  uintptr_t p = reinterpret_cast<uintptr_t>(base + data - bytes);
  if (misalign != 0) p = (p - misalign) / 16 * 16 + misalign;
  memset(base, 0xAB, data);
  return reinterpret_cast<void*>(p);
}

std::vector<char> read_file(const std::string& path) {
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) shim_fail(("cannot read " + path).c_str());
  std::vector<char> data;
  char buf[1 << 16];
  for (size_t n; (n = fread(buf, 1, sizeof buf, f)) > 0;) data.insert(data.end(), buf, buf + n);
  fclose(f);
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = fopen(path.c_str(), "wb");
  if (!f || fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0) {
    shim_fail(("cannot write " + path).c_str());
  }
}

Arg parse(const std::string& dir, const std::string& s) {
  Arg a;
  if (s.rfind("in:", 0) == 0) {
    a.kind = 'b';
    const size_t plus = s.find('+');
    const std::string file = s.substr(3, plus == std::string::npos ? plus : plus - 3);
    const std::vector<char> data = read_file(dir + "/" + file);
    a.bytes = data.size();
    const size_t misalign = plus == std::string::npos ? 0 : std::stoul(s.substr(plus + 1));
    a.ptr = guarded_alloc(a.bytes, misalign);
    memcpy(a.ptr, data.data(), a.bytes);
  } else if (s.rfind("inout:", 0) == 0) {
    a.kind = 'b';
    a.out_file = dir + "/" + s.substr(6);
    const std::vector<char> data = read_file(a.out_file);
    a.bytes = data.size();
    a.ptr = guarded_alloc(a.bytes, 0);
    memcpy(a.ptr, data.data(), a.bytes);
  } else if (s == "null") {
    a.kind = 'b';
  } else if (s.rfind("out:", 0) == 0) {
    a.kind = 'b';
    const size_t colon = s.rfind(':');
    a.out_file = dir + "/" + s.substr(4, colon - 4);
    a.bytes = std::stoul(s.substr(colon + 1));
    a.ptr = guarded_alloc(a.bytes, 0);  // already poisoned
  } else if (s.rfind("i:", 0) == 0) {
    a.kind = 'i';
    a.i = std::stoi(s.substr(2));
  } else if (s.rfind("f:", 0) == 0) {
    a.kind = 'f';
    const uint32_t bits = uint32_t(std::stoul(s.substr(2), nullptr, 16));
    memcpy(&a.f, &bits, 4);
  } else {
    shim_fail(("bad argument " + s).c_str());
  }
  return a;
}

// Argument i of a launch, checked against the kernel's parameter.
const Arg& arg(const Args& a, size_t i, char kind) {
  if (i >= a.size() || a[i].kind != kind) shim_fail("kernel arguments do not match");
  return a[i];
}
template <typename T>
T* buf(const Args& a, size_t i) {
  return static_cast<T*>(arg(a, i, 'b').ptr);
}
int num(const Args& a, size_t i) { return arg(a, i, 'i').i; }
float flt(const Args& a, size_t i) { return arg(a, i, 'f').f; }

// Each kernel called with the parsed arguments; the signatures are those of kernels/*.cu.
#define QUANTIZE(NAME, T, Q)                                                                 \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<T>(a, 0), buf<Q>(a, 1), buf<float>(a, 2), buf<int32_t>(a, 3), num(a, 4),      \
          num(a, 5));                                                                        \
   }}
#define GEMM(NAME, OUT)                                                                      \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<uint8_t>(a, 0), buf<int8_t>(a, 1), buf<float>(a, 2), buf<int32_t>(a, 3),       \
          buf<OUT>(a, 4), num(a, 5), num(a, 6), num(a, 7), num(a, 8), flt(a, 9));           \
   }}
#define GEMV(NAME, OUT)                                                                      \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<uint8_t>(a, 0), buf<int8_t>(a, 1), buf<float>(a, 2), buf<int32_t>(a, 3),       \
          buf<OUT>(a, 4), buf<OUT>(a, 5), num(a, 6), num(a, 7), num(a, 8), num(a, 9),        \
          num(a, 10), num(a, 11), flt(a, 12), flt(a, 13), flt(a, 14));                       \
   }}
#define RMS_NORM(NAME, T)                                                                    \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<T>(a, 0), buf<T>(a, 1), buf<int8_t>(a, 2), buf<float>(a, 3), buf<int32_t>(a, 4), \
          num(a, 5), num(a, 6), flt(a, 7));                                                  \
   }}
#define ROPE_KV(NAME, T)                                                                     \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<T>(a, 0), buf<T>(a, 1), buf<T>(a, 2), num(a, 3), num(a, 4), num(a, 5),         \
          num(a, 6), num(a, 7), buf<int>(a, 8));                                             \
   }}
#define ATTENTION(NAME, COMBINE, T)                                                          \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<T>(a, 0), buf<T>(a, 1), buf<T>(a, 2), buf<T>(a, 3), buf<float>(a, 4),          \
          num(a, 5), num(a, 6), num(a, 7), num(a, 8), num(a, 9), num(a, 10), flt(a, 11),     \
          buf<int>(a, 12));                                                                  \
   }},                                                                                       \
  {#COMBINE, [](const Args& a) { COMBINE(buf<float>(a, 0), buf<T>(a, 1), num(a, 2), num(a, 3)); }}
#define ARGMAX(NAME, T) \
  {#NAME, [](const Args& a) { NAME(buf<T>(a, 0), buf<uint32_t>(a, 1), num(a, 2)); }}
#define DEQUANT(NAME, T)                                                                     \
  {#NAME, [](const Args& a) {                                                                \
     NAME(buf<uint8_t>(a, 0), buf<T>(a, 1), num(a, 2), num(a, 3), flt(a, 4));               \
   }}

const std::map<std::string, void (*)(const Args&)> kKernels = {
    QUANTIZE(quantize_i8_f32, float, int8_t),
    QUANTIZE(quantize_i8_bf16, __nv_bfloat16, int8_t),
    QUANTIZE(quantize_i8_f16, __half, int8_t),
    QUANTIZE(quantize_i32_f32, float, int32_t),
    QUANTIZE(quantize_i32_bf16, __nv_bfloat16, int32_t),
    QUANTIZE(quantize_i32_f16, __half, int32_t),
    GEMV(bitlinear_gemv_f32, float),
    GEMV(bitlinear_gemv_bf16, __nv_bfloat16),
    GEMV(bitlinear_gemv_f16, __half),
    GEMV(bitlinear_gemv_i32, int32_t),
    GEMV(bitlinear_gemv1_f32, float),
    GEMV(bitlinear_gemv1_bf16, __nv_bfloat16),
    GEMV(bitlinear_gemv1_f16, __half),
    GEMV(bitlinear_gemv1_i32, int32_t),
    GEMM(bitlinear_gemm_f32, float),
    GEMM(bitlinear_gemm_bf16, __nv_bfloat16),
    GEMM(bitlinear_gemm_f16, __half),
    GEMM(bitlinear_gemm_i32, int32_t),
    DEQUANT(dequant_f32, float),
    DEQUANT(dequant_bf16, __nv_bfloat16),
    DEQUANT(dequant_f16, __half),
    RMS_NORM(rms_norm_quantize_f32, float),
    RMS_NORM(rms_norm_quantize_bf16, __nv_bfloat16),
    RMS_NORM(rms_norm_quantize_f16, __half),
    RMS_NORM(relu2_rms_norm_quantize_f32, float),
    RMS_NORM(relu2_rms_norm_quantize_bf16, __nv_bfloat16),
    RMS_NORM(relu2_rms_norm_quantize_f16, __half),
    ROPE_KV(rope_kv_append_f32, float),
    ROPE_KV(rope_kv_append_bf16, __nv_bfloat16),
    ROPE_KV(rope_kv_append_f16, __half),
    ATTENTION(attention_decode_f32, attention_combine_f32, float),
    ATTENTION(attention_decode_bf16, attention_combine_bf16, __nv_bfloat16),
    ATTENTION(attention_decode_f16, attention_combine_f16, __half),
    ARGMAX(argmax_f32, float),
    ARGMAX(argmax_bf16, __nv_bfloat16),
    ARGMAX(argmax_f16, __half),
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) shim_fail("usage: driver DIR KERNEL GRID_X GRID_Y BLOCK_X ARG...");
  const std::string dir = argv[1];
  const auto kernel = kKernels.find(argv[2]);
  if (kernel == kKernels.end()) shim_fail("unknown kernel");
  const dim3 grid{unsigned(atoi(argv[3])), unsigned(atoi(argv[4])), 1};
  const dim3 block{unsigned(atoi(argv[5])), 1, 1};
  Args args;
  for (int i = 6; i < argc; ++i) args.push_back(parse(dir, argv[i]));

  launch(grid, block, [&] { kernel->second(args); });

  for (const Arg& a : args) {
    if (!a.out_file.empty()) write_file(a.out_file, a.ptr, a.bytes);
  }
  return 0;
}
