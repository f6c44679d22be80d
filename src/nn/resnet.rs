//! ResNet-18/50 (torchvision's topology and parameter names) and the Barlow Twins projector.

use super::layers::{global_avg_pool, global_avg_pool_backward};
use super::{Backend, BatchNorm, Buffer, Conv2d, Linear, MaxPool, Param, Relu, Tensor, Visit};
use crate::rng::Rng;

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Arch {
    /// Basic blocks 2-2-2-2, 512 features.
    Resnet18,
    /// Bottleneck blocks 3-4-6-3, 2048 features.
    Resnet50,
}

/// The first layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Stem {
    /// 7×7 stride-2 convolution and 3×3 max-pool, for 224×224 images.
    Imagenet,
    /// 3×3 stride-1 convolution, no max-pool, for 28×28 and 32×32 images.
    Small,
}

/// A backbone's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ResNetConfig {
    /// Depth and block type.
    pub arch: Arch,
    /// The first layers: ImageNet (large images) or small (28×28, 32×32).
    pub stem: Stem,
    /// Image channels (3 for RGB, 1 for grayscale).
    pub in_channels: usize,
    /// Channels of the first stage (64 in torchvision); later stages double it.
    pub width: usize,
}

impl ResNetConfig {
    /// A backbone of `arch` with `stem`, for images of `in_channels` channels, `width` channels
    /// in its first stage.
    pub fn new(arch: Arch, stem: Stem, in_channels: usize, width: usize) -> Self {
        Self {
            arch,
            stem,
            in_channels,
            width,
        }
    }

    /// Features out of the global average pool.
    pub fn features(&self) -> usize {
        match self.arch {
            Arch::Resnet18 => self.width * 8,
            Arch::Resnet50 => self.width * 8 * 4,
        }
    }
}

/// A residual block: basic (two 3×3) or bottleneck (1×1, 3×3, 1×1 ×4).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm>,
    downsample: Option<(Conv2d, BatchNorm)>,
    out_relu: Relu,
}

impl Block {
    fn new(
        name: &str,
        bottleneck: bool,
        in_c: usize,
        planes: usize,
        stride: usize,
        rng: &mut Rng,
    ) -> Self {
        let (convs, out_c) = if bottleneck {
            let out = planes * 4;
            (
                vec![
                    Conv2d::new(&format!("{name}.conv1"), in_c, planes, 1, 1, 0, rng),
                    Conv2d::new(&format!("{name}.conv2"), planes, planes, 3, stride, 1, rng),
                    Conv2d::new(&format!("{name}.conv3"), planes, out, 1, 1, 0, rng),
                ],
                out,
            )
        } else {
            (
                vec![
                    Conv2d::new(&format!("{name}.conv1"), in_c, planes, 3, stride, 1, rng),
                    Conv2d::new(&format!("{name}.conv2"), planes, planes, 3, 1, 1, rng),
                ],
                planes,
            )
        };
        let k = convs.len();
        // zero_init_residual: the branch's last norm starts at γ = 0, so each block starts as
        // the identity.
        let bns = convs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let gamma = if i + 1 == k { 0.0 } else { 1.0 };
                BatchNorm::new(&format!("{name}.bn{}", i + 1), c.weight.shape[0], gamma)
            })
            .collect();
        let downsample = (stride != 1 || in_c != out_c).then(|| {
            (
                Conv2d::new(
                    &format!("{name}.downsample.0"),
                    in_c,
                    out_c,
                    1,
                    stride,
                    0,
                    rng,
                ),
                BatchNorm::new(&format!("{name}.downsample.1"), out_c, 1.0),
            )
        });
        Self {
            convs,
            bns,
            downsample,
            out_relu: Relu::default(),
        }
    }

    fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        let k = self.convs.len();
        let mut h = self.convs[0].forward(be, x, train);
        for i in 0..k {
            if i > 0 {
                h = self.convs[i].forward(be, &h, train);
            }
            h = if i + 1 < k {
                self.bns[i].forward_relu(be, &h, train)
            } else {
                self.bns[i].forward(be, &h, train)
            };
        }
        match &mut self.downsample {
            Some((conv, bn)) => {
                let s = conv.forward(be, x, train);
                let s = bn.forward(be, &s, train);
                add_assign(&mut h, &s);
            }
            None => add_assign(&mut h, x),
        }
        self.out_relu.forward(h, train)
    }

    fn backward(&mut self, be: &dyn Backend, dy: Tensor) -> Tensor {
        let d = self.out_relu.backward(dy);
        let k = self.convs.len();
        let mut g = self.bns[k - 1].backward(be, &d);
        for i in (0..k).rev() {
            if i + 1 < k {
                g = self.bns[i].backward_relu(be, &g);
            }
            g = self.convs[i].backward(be, &g, true).expect("dx requested");
        }
        let shortcut = match &mut self.downsample {
            Some((conv, bn)) => {
                let s = bn.backward(be, &d);
                conv.backward(be, &s, true).expect("dx requested")
            }
            None => d,
        };
        g.data
            .iter_mut()
            .zip(&shortcut.data)
            .for_each(|(a, b)| *a += b);
        g
    }

    fn visit(&mut self, p: &mut dyn FnMut(&mut Param)) {
        for (c, b) in self.convs.iter_mut().zip(&mut self.bns) {
            p(&mut c.weight);
            b.visit(p);
        }
        if let Some((c, b)) = &mut self.downsample {
            p(&mut c.weight);
            b.visit(p);
        }
    }

    fn visit_buffers(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        for b in &mut self.bns {
            b.visit_buffers(f);
        }
        if let Some((_, b)) = &mut self.downsample {
            b.visit_buffers(f);
        }
    }
}

/// A ResNet backbone without its classifier (`fc` is the identity, as in Barlow Twins).
#[derive(Debug, Clone)]
pub struct ResNet {
    /// The shape it was built with.
    pub config: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Option<MaxPool>,
    blocks: Vec<Block>,
    pooled_shape: Vec<Vec<usize>>,
}

impl ResNet {
    /// A freshly initialized backbone with torchvision's parameter names.
    pub fn new(config: ResNetConfig, rng: &mut Rng) -> Self {
        let w = config.width;
        let (conv1, maxpool) = match config.stem {
            Stem::Imagenet => (
                Conv2d::new("conv1", config.in_channels, w, 7, 2, 3, rng),
                Some(MaxPool::default()),
            ),
            Stem::Small => (
                Conv2d::new("conv1", config.in_channels, w, 3, 1, 1, rng),
                None,
            ),
        };
        let (bottleneck, counts) = match config.arch {
            Arch::Resnet18 => (false, [2, 2, 2, 2]),
            Arch::Resnet50 => (true, [3, 4, 6, 3]),
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let mut blocks = Vec::new();
        let mut in_c = w;
        for (stage, &count) in counts.iter().enumerate() {
            let planes = w << stage;
            for b in 0..count {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let name = format!("layer{}.{b}", stage + 1);
                blocks.push(Block::new(&name, bottleneck, in_c, planes, stride, rng));
                in_c = planes * expansion;
            }
        }
        Self {
            config,
            conv1,
            bn1: BatchNorm::new("bn1", w, 1.0),
            maxpool,
            blocks,
            pooled_shape: Vec::new(),
        }
    }

    /// Images [N, C, H, W] → features [N, F].
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        let h = self.conv1.forward(be, x, train);
        let mut h = self.bn1.forward_relu(be, &h, train);
        if let Some(mp) = &mut self.maxpool {
            h = mp.forward(&h, train);
        }
        for b in &mut self.blocks {
            h = b.forward(be, &h, train);
        }
        if train {
            self.pooled_shape.push(h.shape.clone());
        }
        global_avg_pool(&h)
    }

    /// Backward from dL/dfeatures; parameter gradients accumulate. The input gradient is not
    /// needed, so the first convolution skips it.
    pub fn backward(&mut self, be: &dyn Backend, dfeat: &Tensor) {
        let shape = self
            .pooled_shape
            .pop()
            .expect("ResNet::backward without a training forward");
        let mut g = global_avg_pool_backward(dfeat, &shape);
        for b in self.blocks.iter_mut().rev() {
            g = b.backward(be, g);
        }
        if let Some(mp) = &mut self.maxpool {
            g = mp.backward(&g);
        }
        let g = self.bn1.backward_relu(be, &g);
        self.conv1.backward(be, &g, false);
    }
}

impl Visit for ResNet {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.conv1.weight);
        self.bn1.visit(f);
        for b in &mut self.blocks {
            b.visit(f);
        }
    }

    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        self.bn1.visit_buffers(f);
        for b in &mut self.blocks {
            b.visit_buffers(f);
        }
    }
}

/// The projector: Linear → BN → ReLU → Linear → BN → ReLU → Linear, no biases on the linears,
/// named as the reference code's `nn.Sequential` (`projector.0`, `.1`, `.3`, `.4`, `.6`).
#[derive(Debug, Clone)]
pub struct Projector {
    linears: Vec<Linear>,
    bns: Vec<BatchNorm>,
}

impl Projector {
    /// `sizes` = [features, hidden…, out], e.g. [2048, 8192, 8192, 8192].
    pub fn new(sizes: &[usize], rng: &mut Rng) -> Self {
        let mut linears = Vec::new();
        let mut bns = Vec::new();
        for i in 0..sizes.len() - 1 {
            linears.push(Linear::new(
                &format!("projector.{}", 3 * i),
                sizes[i],
                sizes[i + 1],
                false,
                rng,
            ));
            if i + 2 < sizes.len() {
                bns.push(BatchNorm::new(
                    &format!("projector.{}", 3 * i + 1),
                    sizes[i + 1],
                    1.0,
                ));
            }
        }
        Self { linears, bns }
    }

    /// Features [N, F] → projections [N, out]; a training forward caches for the backward.
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.clone();
        for i in 0..self.linears.len() {
            h = self.linears[i].forward(be, &h, train);
            if i < self.bns.len() {
                h = self.bns[i].forward_relu(be, &h, train);
            }
        }
        h
    }

    /// Backward from dL/dprojections; parameter gradients accumulate. Returns dL/dfeatures.
    pub fn backward(&mut self, be: &dyn Backend, dz: &Tensor) -> Tensor {
        let mut g = dz.clone();
        for i in (0..self.linears.len()).rev() {
            if i < self.bns.len() {
                g = self.bns[i].backward_relu(be, &g);
            }
            g = self.linears[i]
                .backward(be, &g, true)
                .expect("dx requested");
        }
        g
    }
}

impl Visit for Projector {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for (i, l) in self.linears.iter_mut().enumerate() {
            l.visit(f);
            if let Some(b) = self.bns.get_mut(i) {
                b.visit(f);
            }
        }
    }

    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        for b in &mut self.bns {
            b.visit_buffers(f);
        }
    }
}

fn add_assign(a: &mut Tensor, b: &Tensor) {
    use rayon::prelude::*;
    a.data
        .par_iter_mut()
        .zip(b.data.par_iter())
        .for_each(|(x, y)| *x += y);
}
