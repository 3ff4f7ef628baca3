"""PyTorch eager baseline of the same En_nResNet and train steps, for side-by-side throughput (optional).

Only ``benchmarks/throughput.py --torch`` imports this module; PyTorch is never a library or test dependency
(``pip install torch==2.13.0``). The network mirrors :mod:`enquant.models`: PreAct ResNet (3x3 stem, stages of
basic blocks with 1x1 projection shortcuts, final BN-ReLU, average pool, dense), EnResNet noise ``out + coef *
std(out) * N(0, I)`` (one std over the batch tensor) after every residual sum, n members with averaged
logits. The PGD attack crafts with BatchNorm in eval mode (enquant's default), then the model trains on
x_adv (PGD-AT) or on x and x_adv (loss (6)); SGD with Nesterov momentum and weight decay.
"""

import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int, noise: float):
    super().__init__()
    self.bn1, self.bn2 = nn.BatchNorm2d(cin, momentum=0.1), nn.BatchNorm2d(cout, momentum=0.1)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
    self.noise = noise

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if self.shortcut is not None else x
    out = self.conv2(F.relu(self.bn2(self.conv1(out))))
    out = out + shortcut
    if self.noise:
      out = out + self.noise * out.std() * torch.randn_like(out)
    return out


class ResNet(nn.Module):

  def __init__(self, depth: int = 20, channels: int = 1, num_classes: int = 10, noise: float = 0.1,
               widths=(16, 32, 64)):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
    blocks, cin = [], widths[0]
    for s, w in enumerate(widths):
      for b in range(n):
        blocks.append(Block(cin, w, 2 if s > 0 and b == 0 else 1, noise))
        cin = w
    self.blocks = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(cin, momentum=0.1)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn(self.blocks(self.stem(x))))
    return self.fc(x.mean(dim=(2, 3)))


class Ensemble(nn.Module):

  def __init__(self, members: int, **kwargs):
    super().__init__()
    self.members = nn.ModuleList(ResNet(**kwargs) for _ in range(members))

  def forward(self, x):
    return torch.stack([m(x) for m in self.members]).mean(0)


def pgd(model, x, y, *, eps, step_size, steps):
  was_training = model.training
  model.eval()
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x_adv)
    x_adv = torch.min(torch.max(x_adv.detach() + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
  model.train(was_training)
  return x_adv.detach()


def make_step(case: str, *, members: int, depth: int, shape, batch: int, threads: int = 0):
  """A zero-argument callable running one step of ``case`` (natural | at<K> | tradeoff<K> | pgd<K>-eval)."""
  if threads:
    torch.set_num_threads(threads)
  h, w, c = shape
  model = Ensemble(members, depth=depth, channels=c)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
  gen = torch.Generator().manual_seed(0)
  x = torch.rand(batch, c, h, w, generator=gen)
  y = torch.randint(0, 10, (batch,), generator=gen)
  if case.endswith("-eval"):
    k = int(case[3:-5])
    model.eval()
    return lambda: pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=k)
  kind = case.rstrip("0123456789")
  k = int(case[len(kind):] or 0)

  def step():
    model.train()
    x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=k) if kind != "natural" else None
    opt.zero_grad(set_to_none=True)
    if kind == "natural":
      loss = F.cross_entropy(model(x), y)
    elif kind == "at":
      loss = F.cross_entropy(model(x_adv), y)
    else:
      loss = F.cross_entropy(model(x), y) + 8.0 * F.cross_entropy(model(x_adv), y)
    loss.backward()
    opt.step()

  return step
