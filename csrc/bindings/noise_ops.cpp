// Torch bindings of the fused device-noise kernels in csrc/kernels/device_noise.h (CPU float32).
//
//   noise_pcm_program(w, out_sizes, in_sizes, params, prog_seeds, nu_seeds) -> (weights, drift_nu | None)
//   noise_pcm_read(w_prog, drift_nu | None, out_sizes, in_sizes, params, t_ratio, time_factor,
//                  read_noise_scale, read_seeds) -> weights
//   noise_gaussian_program(w, in_sizes, sigma, multiplicative_sigma, add_seed, mul_seed) -> weights
//   noise_gaussian_read(w_prog, in_sizes, read_sigma, read_seed) -> weights
//   noise_tile_absmax(w, out_sizes, in_sizes) -> [n_out_tiles, n_in_tiles]
//   noise_log(x), noise_pow(x, exponent) -> float32 (double maths rounded once: references for tests)
//   noise_log_f32(x), noise_pow_f32(x, exponent), noise_exp_f32(x) -> the kernels' float32 maths (tests)
// noise_pcm_program / noise_pcm_read take optional output buffers (out_weights, out_nu / out).
//
// `params` is a dict of Python floats built by romer_kernels/noise/fused.py (float32 rounding happens
// here, as torch rounds Python scalars). Seeds are Philox stream keys (`draw.seed(purpose, slot)`);
// None means "no noise of this kind"; pair seeds are (G+ slot 0, G- slot 1). Work runs without the GIL
// on at::get_num_threads() OpenMP threads; results do not depend on the thread count.
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kernels/device_noise.h"

namespace py = pybind11;
namespace rn = romer::noise;

namespace {

// `out` if it is a float32 CPU contiguous tensor of `sizes` that does not overlap `w`, else a new tensor.
// Reusing the previous call's result avoids page-faulting fresh memory (16 MB per 2048x2048 matrix).
torch::Tensor output(const std::optional<torch::Tensor>& out, at::IntArrayRef sizes, const torch::Tensor& w,
                     const char* name) {
  if (!out.has_value() || !out->defined()) return torch::empty(sizes, w.options());
  const torch::Tensor& o = *out;
  TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == torch::kFloat32 && o.is_contiguous() && o.sizes() == sizes &&
                  !o.requires_grad(),
              name, " must be a contiguous float32 CPU tensor of shape ", sizes, " (no grad)");
  const auto* a0 = static_cast<const char*>(o.data_ptr());
  const auto* b0 = static_cast<const char*>(w.data_ptr());
  const auto a1 = a0 + o.nbytes(), b1 = b0 + w.nbytes();
  TORCH_CHECK(a1 <= b0 || b1 <= a0, name, " must not overlap the input");
  return o;
}

// `out` for a kernel that may write in place: either exactly `w` (same memory and shape) or no overlap.
torch::Tensor output_or_inplace(const std::optional<torch::Tensor>& out, const torch::Tensor& w, const char* name) {
  if (out.has_value() && out->defined() && out->data_ptr() == w.data_ptr() && out->sizes() == w.sizes() &&
      out->is_contiguous() && out->scalar_type() == w.scalar_type() && !out->requires_grad()) {
    return *out;
  }
  return output(out, w.sizes(), w, name);
}

torch::Tensor checked_matrix(const torch::Tensor& w, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat32 && w.dim() == 2, name,
              " must be a 2-D float32 CPU tensor");
  return w.contiguous();
}

rn::TileSizes tile_sizes(const torch::Tensor& w, const std::vector<int64_t>& out_sizes,
                         const std::vector<int64_t>& in_sizes) {
  int64_t rows = 0, cols = 0;
  for (int64_t s : out_sizes) {
    TORCH_CHECK(s > 0, "tile sizes must be positive");
    rows += s;
  }
  for (int64_t s : in_sizes) {
    TORCH_CHECK(s > 0, "tile sizes must be positive");
    cols += s;
  }
  TORCH_CHECK(rows == w.size(0) && cols == w.size(1), "tile sizes sum to ", rows, "x", cols, ", weight is ",
              w.size(0), "x", w.size(1));
  return rn::TileSizes{out_sizes, in_sizes};
}

uint64_t seed_value(const py::handle& obj) {
  const py::int_ v = py::reinterpret_borrow<py::object>(obj).cast<py::int_>();
  const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
  if (u == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("stream seed must be an int in [0, 2**64)");
  }
  return static_cast<uint64_t>(u);
}

rn::Stream stream(const py::object& seed) {
  rn::Stream s;
  if (!seed.is_none()) {
    s.has = true;
    s.seed = seed_value(seed);
  }
  return s;
}

std::pair<rn::Stream, rn::Stream> pair_streams(const py::object& seeds) {
  if (seeds.is_none()) return {rn::Stream{}, rn::Stream{}};
  const py::sequence seq = seeds.cast<py::sequence>();
  TORCH_CHECK(seq.size() == 2, "pair seeds must be (slot 0, slot 1)");
  return {stream(seq[0]), stream(seq[1])};
}

float f32(const py::dict& d, const char* key) {
  TORCH_CHECK(d.contains(key), "noise params: missing '", key, "'");
  return static_cast<float>(d[key].cast<double>());
}

rn::PieceFit piece(const py::dict& d, const char* key) {
  TORCH_CHECK(d.contains(key), "noise params: missing '", key, "'");
  const std::vector<double> v = d[key].cast<std::vector<double>>();
  TORCH_CHECK(v.size() == 8, "noise params: '", key, "' needs (thr, a, b, lo, hi, p2, p1, p0)");
  return rn::PieceFit{static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2]),
                      static_cast<float>(v[3]), static_cast<float>(v[4]), static_cast<float>(v[5]),
                      static_cast<float>(v[6]), static_cast<float>(v[7])};
}

rn::PcmParams pcm_params(const py::dict& d) {
  rn::PcmParams p;
  p.g_max = f32(d, "g_max");
  for (double c : d["prog_coeff"].cast<std::vector<double>>()) p.prog_coeff.push_back(static_cast<float>(c));
  TORCH_CHECK(!p.prog_coeff.empty(), "noise params: prog_coeff is empty");
  p.reference_ratio = f32(d, "reference_ratio");
  p.prog_noise_scale = f32(d, "prog_noise_scale");
  p.sigma_off = f32(d, "sigma_off");
  p.drift_scale = f32(d, "drift_scale");
  p.mu_off = f32(d, "mu_off");
  p.sigma_nu_off = f32(d, "sigma_nu_off");
  p.nu_mu = piece(d, "nu_mu");
  p.nu_sigma = piece(d, "nu_sigma");
  const std::string family = d["q_family"].cast<std::string>();
  const std::vector<double> q = d["q"].cast<std::vector<double>>();
  p.q = rn::ReadQ{};
  if (family == "pow") {
    TORCH_CHECK(q.size() == 4, "noise params: pow Q_s needs (exponent, floor, numerator, cap)");
    p.q.family = 0;
    p.q.exponent = static_cast<float>(q[0]);
    p.q.floor = static_cast<float>(q[1]);
    p.q.numerator = static_cast<float>(q[2]);
    p.q.cap = static_cast<float>(q[3]);
  } else if (family == "piecewise") {
    TORCH_CHECK(q.size() == 9, "noise params: piecewise Q_s needs (thr, a, b, lo, hi, p3, p2, p1, p0)");
    p.q.family = 1;
    float* dst[9] = {&p.q.thr, &p.q.a, &p.q.b, &p.q.lo, &p.q.hi, &p.q.p3, &p.q.p2, &p.q.p1, &p.q.p0};
    for (int i = 0; i < 9; ++i) *dst[i] = static_cast<float>(q[i]);
  } else {
    TORCH_CHECK(false, "noise params: unknown q_family '", family, "'");
  }
  return p;
}

py::tuple pcm_program(const torch::Tensor& w_in, const std::vector<int64_t>& out_sizes,
                      const std::vector<int64_t>& in_sizes, const py::dict& params, const py::object& prog_seeds,
                      const py::object& nu_seeds, const std::optional<torch::Tensor>& out_weights,
                      const std::optional<torch::Tensor>& out_nu) {
  const torch::Tensor w = checked_matrix(w_in, "w");
  const rn::TileSizes grid = tile_sizes(w, out_sizes, in_sizes);
  const rn::PcmParams p = pcm_params(params);
  const auto [pp, pm] = pair_streams(prog_seeds);
  const auto [np, nm] = pair_streams(nu_seeds);
  TORCH_CHECK(pp.has == pm.has && np.has == nm.has, "pair seeds need both slots");
  const int64_t rows = w.size(0), cols = w.size(1);
  torch::Tensor weights = output(out_weights, {rows, cols}, w, "out_weights");
  torch::Tensor nu;
  if (np.has) {
    nu = output(out_nu, {2, rows, cols}, w, "out_nu");
    TORCH_CHECK(!nu.is_same(weights) && nu.data_ptr() != weights.data_ptr(), "out_nu must not be out_weights");
  }
  {
    py::gil_scoped_release no_gil;
    rn::pcm_program(w.data_ptr<float>(), rows, cols, grid, p, pp, pm, np, nm, weights.data_ptr<float>(),
                    np.has ? nu.data_ptr<float>() : nullptr, at::get_num_threads());
  }
  return py::make_tuple(weights, np.has ? py::object(py::cast(nu)) : py::object(py::none()));
}

torch::Tensor pcm_read(const torch::Tensor& w_in, const std::optional<torch::Tensor>& target_in,
                       const std::vector<int64_t>& out_sizes, const std::vector<int64_t>& in_sizes,
                       const py::dict& params, double t_ratio, double time_factor, double read_noise_scale,
                       const py::object& read_seeds, const py::object& nu_seeds,
                       const std::optional<torch::Tensor>& out_in) {
  const torch::Tensor w = checked_matrix(w_in, "w_prog");
  const rn::TileSizes grid = tile_sizes(w, out_sizes, in_sizes);
  const rn::PcmParams p = pcm_params(params);
  const auto [rp, rm] = pair_streams(read_seeds);
  const auto [np, nm] = pair_streams(nu_seeds);
  TORCH_CHECK(rp.has == rm.has && np.has == nm.has, "pair seeds need both slots");
  const int64_t rows = w.size(0), cols = w.size(1);
  torch::Tensor target;
  if (target_in.has_value() && np.has) {
    target = checked_matrix(*target_in, "w_target");
    TORCH_CHECK(target.sizes() == w.sizes(), "w_target must have w_prog's shape");
  }
  TORCH_CHECK(!np.has || target.defined(), "drift (nu_seeds) needs w_target");
  torch::Tensor out = output_or_inplace(out_in, w, "out");
  if (target.defined()) output(out, {rows, cols}, target, "out");  // must not overlap w_target
  {
    py::gil_scoped_release no_gil;
    rn::pcm_read(w.data_ptr<float>(), target.defined() ? target.data_ptr<float>() : nullptr, rows, cols, grid, p,
                 t_ratio, time_factor, static_cast<float>(read_noise_scale), rp, rm, np, nm, out.data_ptr<float>(),
                 at::get_num_threads());
  }
  return out;
}

torch::Tensor gaussian_program(const torch::Tensor& w_in, const std::vector<int64_t>& in_sizes, double sigma,
                               double multiplicative_sigma, const py::object& add_seed, const py::object& mul_seed,
                               const std::optional<torch::Tensor>& out_in) {
  const torch::Tensor w = checked_matrix(w_in, "w");
  tile_sizes(w, {w.size(0)}, in_sizes);
  const rn::Stream add = stream(add_seed), mul = stream(mul_seed);
  torch::Tensor out = output(out_in, w.sizes(), w, "out");
  {
    py::gil_scoped_release no_gil;
    rn::gaussian_program(w.data_ptr<float>(), w.size(0), w.size(1), in_sizes, static_cast<float>(sigma),
                         static_cast<float>(multiplicative_sigma), add, mul, out.data_ptr<float>(),
                         at::get_num_threads());
  }
  return out;
}

torch::Tensor gaussian_read(const torch::Tensor& w_in, const std::vector<int64_t>& in_sizes, double read_sigma,
                            const py::object& read_seed, const std::optional<torch::Tensor>& out_in) {
  const torch::Tensor w = checked_matrix(w_in, "w_prog");
  tile_sizes(w, {w.size(0)}, in_sizes);
  const rn::Stream read = stream(read_seed);
  TORCH_CHECK(read.has, "gaussian read needs a READ stream seed");
  torch::Tensor out = output_or_inplace(out_in, w, "out");
  {
    py::gil_scoped_release no_gil;
    rn::gaussian_read(w.data_ptr<float>(), w.size(0), w.size(1), in_sizes, static_cast<float>(read_sigma), read,
                      out.data_ptr<float>(), at::get_num_threads());
  }
  return out;
}

torch::Tensor tile_absmax(const torch::Tensor& w_in, const std::vector<int64_t>& out_sizes,
                          const std::vector<int64_t>& in_sizes) {
  const torch::Tensor w = checked_matrix(w_in, "w");
  const rn::TileSizes grid = tile_sizes(w, out_sizes, in_sizes);
  std::vector<float> m;
  {
    py::gil_scoped_release no_gil;
    m = rn::tile_absmax(w.data_ptr<float>(), w.size(0), w.size(1), grid, at::get_num_threads());
  }
  torch::Tensor out = torch::empty({static_cast<int64_t>(out_sizes.size()), static_cast<int64_t>(in_sizes.size())},
                                   w.options());
  std::copy(m.begin(), m.end(), out.data_ptr<float>());
  return out;
}

torch::Tensor checked_vector(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "x must be a float32 CPU tensor");
  return x.contiguous();
}

torch::Tensor log_op(const torch::Tensor& x_in) {
  const torch::Tensor x = checked_vector(x_in);
  torch::Tensor out = torch::empty_like(x);
  rn::log_f32(x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
  return out;
}

torch::Tensor fast_op(const torch::Tensor& x_in, int which, double exponent) {
  const torch::Tensor x = checked_vector(x_in);
  torch::Tensor out = torch::empty_like(x);
  if (which == 0) rn::log_fast_f32(x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
  else if (which == 1) rn::pow_fast_f32(x.data_ptr<float>(), static_cast<float>(exponent), out.data_ptr<float>(), x.numel());
  else rn::exp_fast_f32(x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
  return out;
}

torch::Tensor pow_op(const torch::Tensor& x_in, double exponent) {
  const torch::Tensor x = checked_vector(x_in);
  torch::Tensor out = torch::empty_like(x);
  rn::pow_f32(x.data_ptr<float>(), static_cast<float>(exponent), out.data_ptr<float>(), x.numel());
  return out;
}

}  // namespace

void register_noise_ops(py::module_& m) {
  m.def("noise_pcm_program", &pcm_program, py::arg("w"), py::arg("out_sizes"), py::arg("in_sizes"),
        py::arg("params"), py::arg("prog_seeds"), py::arg("nu_seeds"), py::arg("out_weights") = py::none(),
        py::arg("out_nu") = py::none(),
        "Fused PCM/HERMES programming: (weights [out, in], drift_nu [2, out, in] or None); out_weights / out_nu: "
        "optional buffers to write them into (e.g. the previous programming's, to skip fresh memory).");
  m.def("noise_pcm_read", &pcm_read, py::arg("w_prog"), py::arg("w_target"), py::arg("out_sizes"),
        py::arg("in_sizes"), py::arg("params"), py::arg("t_ratio"), py::arg("time_factor"),
        py::arg("read_noise_scale"), py::arg("read_seeds"), py::arg("nu_seeds"), py::arg("out") = py::none(),
        "Fused PCM/HERMES read: re-conversion, drift (t/t_0)^-nu with the drift exponents drawn again from "
        "w_target and nu_seeds, 1/f read noise; into `out` if given (which may be w_prog: in place).");
  m.def("noise_gaussian_program", &gaussian_program, py::arg("w"), py::arg("in_sizes"), py::arg("sigma"),
        py::arg("multiplicative_sigma"), py::arg("add_seed"), py::arg("mul_seed"), py::arg("out") = py::none(),
        "Fused Gaussian chip programming noise (into `out` if given).");
  m.def("noise_gaussian_read", &gaussian_read, py::arg("w_prog"), py::arg("in_sizes"), py::arg("read_sigma"),
        py::arg("read_seed"), py::arg("out") = py::none(),
        "Fused Gaussian chip read noise (into `out` if given, which may be w_prog: in place).");
  m.def("noise_tile_absmax", &tile_absmax, py::arg("w"), py::arg("out_sizes"), py::arg("in_sizes"),
        "Abs-max of every tile, [n_out_tiles, n_in_tiles].");
  m.def("noise_log", &log_op, py::arg("x"), "ln(x) of x >= 0 in double, rounded to float32 (0 -> -inf).");
  m.def("noise_pow", &pow_op, py::arg("x"), py::arg("exponent"),
        "x ** float32(exponent) for x >= 0, in double, rounded to float32.");
  m.def("noise_log_f32", [](const torch::Tensor& x) { return fast_op(x, 0, 0.0); }, py::arg("x"),
        "The kernels' float32 ln(x) of x >= 0 (0 -> -inf).");
  m.def("noise_pow_f32", [](const torch::Tensor& x, double e) { return fast_op(x, 1, e); }, py::arg("x"),
        py::arg("exponent"), "The kernels' float32 x ** float32(exponent) = exp(e ln x) for x >= 0.");
  m.def("noise_exp_f32", [](const torch::Tensor& x) { return fast_op(x, 2, 0.0); }, py::arg("x"),
        "The kernels' float32 exp(x).");
}
