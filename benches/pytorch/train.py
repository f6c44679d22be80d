#!/usr/bin/env python3
"""The reference Barlow Twins recipe in PyTorch, for side-by-side comparison with `barlow train`.

Same model (torchvision's ResNet topology with a configurable first-stage width and an optional
small-input stem, zero-initialized residual norms), projector, loss, LARS, learning-rate schedule,
augmentations and kNN monitor as the reference training code and as barlow. Prints JSON lines:
{"event": "step"|"knn"|"summary", ...}.

    python3 benches/pytorch/train.py --device cpu --threads 2 --epochs 10
    python3 benches/pytorch/train.py --synthetic --steps 20        # step time only, random batches
"""
import argparse
import gzip
import json
import math
import os
import random
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN = os.path.join(HERE, "..", "..", "data", "fashion-mnist-sample")


# ----- model -----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, arch, width, stem, in_ch):
        super().__init__()
        block, counts = (BasicBlock, [2, 2, 2, 2]) if arch == "resnet18" else (Bottleneck, [3, 4, 6, 3])
        if stem == "small":
            self.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_ch, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage, n in enumerate(counts):
            blocks = []
            for b in range(n):
                blocks.append(block(cin, width << stage, 2 if stage > 0 and b == 0 else 1))
                cin = (width << stage) * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class BarlowTwins(nn.Module):
    def __init__(self, args, in_ch):
        super().__init__()
        self.backbone = ResNet(args.arch, args.width, args.stem, in_ch)
        sizes = [self.backbone.features] + args.projector
        layers = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)
        self.lambd = args.lambd

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2)
        c.div_(y1.shape[0])
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        return on_diag + self.lambd * off_diag


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def learning_rates(args, step, steps_per_epoch):
    max_steps = args.epochs * steps_per_epoch
    warmup = args.warmup_epochs * steps_per_epoch
    base = args.batch_size / 256
    if step < warmup:
        lr = base * step / warmup
    else:
        s, span = step - warmup, max(max_steps - warmup, 1)
        q = 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
        lr = base * q + base * 0.001 * (1 - q)
    return lr * args.lr_weights, lr * args.lr_biases


# ----- data ------------------------------------------------------------------------------------
def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def load(args):
    if args.data == "builtin":
        d = BUILTIN
        xs = [read_idx(os.path.join(d, f"{s}-images-idx3-ubyte.gz")) for s in ("train", "t10k")]
        ys = [read_idx(os.path.join(d, f"{s}-labels-idx1-ubyte.gz")) for s in ("train", "t10k")]
        return [(x.unsqueeze(-1).numpy(), y.long()) for x, y in zip(xs, ys)], 1
    import torchvision

    out = []
    for split in ("train", "test"):
        ds = torchvision.datasets.ImageFolder(os.path.join(args.data, split))
        imgs = [torch.from_numpy(__import__("numpy").array(ds.loader(p).convert("RGB"))) for p, _ in ds.samples]
        out.append((torch.stack(imgs).numpy(), torch.tensor(ds.targets)))
    return out, 3


def pixel_stats(x):
    t = torch.from_numpy(x[:: max(1, len(x) // 2000)]).float() / 255.0
    return t.mean(dim=(0, 1, 2)).tolist(), t.std(dim=(0, 1, 2)).clamp_min(1e-3).tolist()


def make_transforms(size, mean, std, blur_p, sol_p, ksize):
    import torchvision.transforms as T
    from PIL import ImageFilter, ImageOps

    class Blur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if random.random() < self.p:
                return img.filter(ImageFilter.GaussianBlur(radius=random.random() * 1.9 + 0.1))
            return img

    class Solarize:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if random.random() < self.p else img

    scale = (0.2, 1.0) if size < 96 else (0.08, 1.0)
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        Blur(blur_p),
        Solarize(sol_p),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, size, mean, std):
        from PIL import Image

        self.x, self.Image = x, Image
        self.t1 = make_transforms(size, mean, std, 1.0, 0.0, 3)
        self.t2 = make_transforms(size, mean, std, 0.1, 0.2, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        a = self.x[i]
        img = self.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        return self.t1(img), self.t2(img)


@torch.no_grad()
def knn_top1(model, train, test, mean, std, device, k=20, t=0.1):
    model.eval()

    def feats(x):
        out = []
        for i in range(0, len(x), 256):
            b = torch.from_numpy(x[i : i + 256]).float().div(255).permute(0, 3, 1, 2)
            b = (b - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
            out.append(F.normalize(model.backbone(b.to(device)).float(), dim=1).cpu())
        return torch.cat(out)

    fb, ft = feats(train[0]), feats(test[0])
    sim = ft @ fb.T
    w, idx = sim.topk(k, dim=1)
    labels = train[1][idx]
    votes = torch.zeros(len(ft), int(train[1].max()) + 1).scatter_add_(1, labels, (w / t).exp())
    model.train()
    return (votes.argmax(1) == test[1]).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default="builtin")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--stem", default="small", choices=["small", "imagenet"])
    p.add_argument("--projector", default="512,512,512")
    p.add_argument("--lambd", type=float, default=0.0051)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=None)
    p.add_argument("--lr-weights", type=float, default=0.2)
    p.add_argument("--lr-biases", type=float, default=0.0048)
    p.add_argument("--weight-decay", type=float, default=1.5e-6)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=0, help="stop training after this many seconds")
    p.add_argument("--knn-every", type=int, default=1)
    p.add_argument("--synthetic", action="store_true", help="time steps on random batches only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--size", type=int, default=0, help="image size for --synthetic (default 28 small / 224)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.projector = [int(v) for v in args.projector.split(",")]
    if args.warmup_epochs is None:
        args.warmup_epochs = 10 if args.epochs >= 100 else max(1, math.ceil(args.epochs / 10))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    dev = torch.device(args.device)
    emit = lambda **kw: print(json.dumps(kw), flush=True)

    in_ch = 1 if (args.data == "builtin" and not args.synthetic) else 3
    if args.synthetic:
        in_ch = 1 if args.stem == "small" else 3
    model = BarlowTwins(args, in_ch).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = [q for q in model.parameters() if q.ndim != 1]
    biases = [q for q in model.parameters() if q.ndim == 1]
    opt = LARS([{"params": weights}, {"params": biases}], lr=0, weight_decay=args.weight_decay)
    step_fn = torch.compile(model) if args.compile else model

    def train_step(y1, y2, step, spe):
        lw, lb = learning_rates(args, step, spe)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lw, lb
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = step_fn(y1, y2)
        loss.backward()
        opt.step()
        return loss

    if args.synthetic:
        size = args.size or (28 if args.stem == "small" else 224)
        mk = lambda: torch.randn(args.batch_size, in_ch, size, size, device=dev)
        y1, y2 = mk(), mk()
        if args.channels_last:
            y1, y2 = y1.to(memory_format=torch.channels_last), y2.to(memory_format=torch.channels_last)
        for s in range(3):
            train_step(y1, y2, s, 100).item()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for s in range(args.steps):
            loss = train_step(y1, y2, s, 100)
        sync()
        dt = time.perf_counter() - t
        emit(event="summary", synthetic=True, pairs_per_s=args.steps * args.batch_size / dt, step_s=dt / args.steps,
             loss=loss.item(), threads=torch.get_num_threads())
        return 0

    (train, test), in_ch = load(args)
    if args.max_train:
        train = (train[0][: args.max_train], train[1][: args.max_train])
    mean, std = pixel_stats(train[0])
    loader = torch.utils.data.DataLoader(
        Pairs(train[0], train[0].shape[1], mean, std), batch_size=args.batch_size, shuffle=True,
        drop_last=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    spe = len(loader)
    acc0 = knn_top1(model, train, test, mean, std, dev)
    emit(event="knn", epoch=0, top1=acc0)
    step, start, train_time = 0, time.perf_counter(), 0.0
    stop = False
    for epoch in range(args.epochs):
        for y1, y2 in loader:
            t = time.perf_counter()
            loss = train_step(y1.to(dev), y2.to(dev), step, spe).item()
            step += 1
            train_time = time.perf_counter() - start
            emit(event="step", epoch=epoch, step=step, loss=loss, pairs_per_s=step * args.batch_size / train_time)
            if args.time_budget and train_time > args.time_budget:
                stop = True
                break
        if stop or (args.knn_every and (epoch + 1) % args.knn_every == 0) or epoch + 1 == args.epochs:
            # kNN time is excluded from the training clock, as in barlow's images/s.
            pause = time.perf_counter()
            acc = knn_top1(model, train, test, mean, std, dev)
            start += time.perf_counter() - pause
            emit(event="knn", epoch=epoch + 1, top1=acc)
        if stop:
            break
    emit(event="summary", steps=step, train_seconds=train_time, pairs_per_s=step * args.batch_size / max(train_time, 1e-9),
         knn_initial=acc0, knn_final=acc, threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
