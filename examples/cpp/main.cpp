// kdfast from C++: fused distillation loss + gradient, checked against a float64 autograd
// reference built from plain ATen ops. Exits 1 if they disagree.
#include <kdfast/distill.h>
#include <torch/torch.h>

#include <cstdio>

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
  return ok ? 0 : 1;
}
