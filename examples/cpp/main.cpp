// kdfast from C++: fused distillation loss + gradient, checked against a float64 autograd
// reference built from plain ATen ops. Exits 1 if they disagree.
#include <kdfast/distill.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>

// The output layer fused with the loss: the student's logits hidden @ W.T + b never exist in
// full (rows go through in chunks of 40). Checked against distillation_loss on the
// materialized logits, with the layer's gradients from the chain rule.
bool linear_layer_matches() {
  const int64_t rows = 128, hidden_size = 64, classes = 1000;
  const torch::Tensor hidden = torch::randn({rows, hidden_size});
  const torch::Tensor weight = torch::randn({classes, hidden_size}) / 8;
  const torch::Tensor bias = torch::randn({classes});
  kdfast::LinearTeacher teacher;
  teacher.logits = torch::randn({rows, classes}) * 3;
  const torch::Tensor labels = torch::randint(classes, {rows}, torch::kLong);
  kdfast::DistillOptions opt;
  opt.temperature = 2.0;
  const kdfast::LinearDistillResult fused = kdfast::linear_distillation_loss(
      hidden, weight, bias, teacher, labels, opt, /*chunk_rows=*/40);
  const torch::Tensor logits = torch::addmm(bias, hidden, weight.t());
  const kdfast::DistillResult plain = kdfast::distillation_loss(logits, teacher.logits, labels, opt);
  const auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return ((a - b).abs().max() / b.abs().max()).item<double>();
  };
  const double err = std::max({rel(fused.loss, plain.loss),
                               rel(fused.grad_hidden, plain.grad_student.mm(weight)),
                               rel(fused.grad_weight, plain.grad_student.t().mm(hidden)),
                               rel(fused.grad_bias, plain.grad_student.sum(0))});
  std::printf("linear_distillation_loss: loss = %.6f, max relative error vs unfused %.2e\n",
              fused.loss.item<double>(), err);
  return err < 1e-4;
}

int main() {
  torch::manual_seed(0);
  const int64_t batch = 8, seq = 16, classes = 1000, ignore = -100;
  const torch::Tensor student = torch::randn({batch, seq, classes}) * 3;
  const torch::Tensor teacher = torch::randn({batch, seq, classes}) * 3;
  torch::Tensor labels = torch::randint(classes, {batch, seq}, torch::kLong);
  labels.slice(/*dim=*/1, /*start=*/12).fill_(ignore);  // padding at the end of each sequence

  kdfast::DistillOptions opt;
  opt.temperature = 4.0;
  opt.alpha = 0.9;
  const kdfast::DistillResult out = kdfast::distillation_loss(student, teacher, labels, opt);
  std::printf("loss = %.6f  |grad_student| = %.6e  (%s, shape [%ld, %ld, %ld])\n",
              out.loss.item<double>(), out.grad_student.norm().item<double>(),
              c10::toString(out.grad_student.scalar_type()), (long)batch, (long)seq, (long)classes);

  // Reference: the README's formulas in float64, differentiated by autograd.
  const double T = opt.temperature, alpha = opt.alpha;
  torch::Tensor s = student.to(torch::kDouble).requires_grad_();
  const torch::Tensor log_q = torch::log_softmax(s / T, -1);
  const torch::Tensor log_p = torch::log_softmax(teacher.to(torch::kDouble) / T, -1);
  const torch::Tensor soft = (log_p.exp() * (log_p - log_q)).sum(-1) * (T * T);  // KL(p||q) T^2
  const torch::Tensor counted = labels != ignore;
  const torch::Tensor hard =
      -torch::log_softmax(s, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const torch::Tensor rows = torch::where(counted, alpha * soft + (1 - alpha) * hard, 0.0);
  const torch::Tensor ref = rows.sum() / counted.sum().clamp_min(1);
  ref.backward();

  const double loss_err = std::abs(out.loss.item<double>() - ref.item<double>());
  const double grad_err = (out.grad_student.to(torch::kDouble) - s.grad()).abs().max().item<double>();
  const double grad_max = s.grad().abs().max().item<double>();
  std::printf("reference loss = %.6f  |loss err| = %.2e  max |grad err| = %.2e (max |grad| %.2e)\n",
              ref.item<double>(), loss_err, grad_err, grad_max);
  const bool ok = loss_err <= 1e-4 * std::abs(ref.item<double>()) + 1e-6 && grad_err <= 1e-4 * grad_max;
  std::printf("%s\n", ok ? "OK: kdfast matches the float64 autograd reference" : "MISMATCH");
  return ok && linear_layer_matches() ? 0 : 1;
}
