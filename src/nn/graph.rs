//! The network as data: the list of nodes of a ResNet backbone and the Barlow Twins projector,
//! built once from their configuration, with torchvision's layer names. The CPU layers
//! ([`super::resnet`]) and the CUDA trainer both interpret this list, so the topology is written
//! down in one place.
//!
//! Values are numbered: value 0 is the input, and each node writes one new value. A node reads
//! its input value and, for a norm that closes a residual block, the block's shortcut value.
//! Shapes are per image and channel counts only; [`Graph::spatial`] derives the spatial sizes
//! for an input size (a projector's values are 1×1).

use super::resnet::{Arch, ResNetConfig, Stem};
use super::ConvSpec;
use crate::error::{Error, Result};

/// A convolution's shape, without the input's spatial size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels.
    pub in_c: usize,
    /// Output channels.
    pub out_c: usize,
    /// Square kernel side.
    pub k: usize,
    /// Stride, both directions.
    pub stride: usize,
    /// Zero padding, both sides, both directions.
    pub pad: usize,
}

impl ConvShape {
    /// The full convolution over an `h`×`w` input.
    pub fn at(&self, h: usize, w: usize) -> ConvSpec {
        ConvSpec {
            in_c: self.in_c,
            out_c: self.out_c,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            h,
            w,
        }
    }
}

/// What a node computes. Parameters are named after the node: `{name}.weight` (and
/// `{name}.bias` for a norm), running statistics `{name}.running_mean`/`running_var`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// A convolution without bias (weight OIHW).
    Conv(ConvShape),
    /// Batch norm with learned γ, β, then `+ residual` when given, then ReLU when `relu`.
    /// `dense` marks the projector's norms, over features rather than images.
    Norm {
        /// The shortcut value added after normalizing (a residual block's last norm).
        residual: Option<usize>,
        /// Whether a ReLU follows.
        relu: bool,
        /// A norm over N×C features (the projector's), rather than over images.
        dense: bool,
    },
    /// 3×3 max-pool, stride 2, padding 1 (the ImageNet stem's).
    MaxPool,
    /// Global average pool: [N, C, H, W] → [N, C].
    AvgPool,
    /// A linear layer without bias (weight out×in).
    Linear {
        /// Input features.
        inp: usize,
        /// Output features.
        out: usize,
    },
}

/// One node: `y = op(x)`, with the layer's name in torchvision's naming (empty for pooling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Layer name, e.g. `layer1.0.conv1` or `projector.3`.
    pub name: String,
    /// What it computes.
    pub op: Op,
    /// Input value.
    pub x: usize,
    /// Output value (always a new one).
    pub y: usize,
}

/// A network as a list of nodes in execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// The nodes, in forward order; a residual's shortcut branch runs before the norm that
    /// adds it.
    pub nodes: Vec<Node>,
    /// Channels (or features) of each value; value 0 is the input.
    pub channels: Vec<usize>,
    /// Nodes that hold parameters, in the order a state dict lists them (torchvision's: a
    /// block's `downsample` after its `bn3`).
    pub param_order: Vec<usize>,
}

/// Which spatial size each value has (1×1 for features).
pub type Spatial = Vec<(usize, usize)>;

impl Graph {
    fn with_input(channels: usize) -> Self {
        Self {
            nodes: Vec::new(),
            channels: vec![channels],
            param_order: Vec::new(),
        }
    }

    /// A ResNet backbone: images → pooled features.
    pub fn resnet(cfg: &ResNetConfig) -> Self {
        let mut g = Self::with_input(cfg.in_channels);
        let w = cfg.width;
        let stem = match cfg.stem {
            Stem::Imagenet => (7, 2, 3),
            Stem::Small => (3, 1, 1),
        };
        let mut x = g.conv("conv1", 0, w, stem);
        x = g.norm("bn1", x, None, true, false);
        if cfg.stem == Stem::Imagenet {
            x = g.push(String::new(), Op::MaxPool, x, w);
        }
        let (bottleneck, counts) = match cfg.arch {
            Arch::Resnet18 => (false, [2, 2, 2, 2]),
            Arch::Resnet50 => (true, [3, 4, 6, 3]),
        };
        for (stage, &count) in counts.iter().enumerate() {
            for b in 0..count {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let name = format!("layer{}.{b}", stage + 1);
                x = g.block(&name, bottleneck, x, w << stage, stride);
            }
        }
        let c = g.channels[x];
        g.push(String::new(), Op::AvgPool, x, c);
        g
    }

    /// The projector over `sizes` = [features, hidden…, out]: Linear → BN → ReLU … → Linear,
    /// named as the reference code's `nn.Sequential` (`projector.0`, `.1`, `.3`, `.4`, `.6`).
    pub fn projector(sizes: &[usize]) -> Self {
        let mut g = Self::with_input(sizes.first().copied().unwrap_or(0));
        g.extend_projector(0, sizes);
        g
    }

    /// The whole model: backbone, then projector over its features.
    pub fn model(backbone: &ResNetConfig, projector: &[usize]) -> Self {
        let mut g = Self::resnet(backbone);
        let mut sizes = vec![backbone.features()];
        sizes.extend_from_slice(projector);
        let features = g.output();
        g.extend_projector(features, &sizes);
        g
    }

    fn extend_projector(&mut self, mut x: usize, sizes: &[usize]) {
        let layers = sizes.len().saturating_sub(1);
        for i in 0..layers {
            let op = Op::Linear {
                inp: sizes[i],
                out: sizes[i + 1],
            };
            x = self.push(format!("projector.{}", 3 * i), op, x, sizes[i + 1]);
            self.param_order.push(self.nodes.len() - 1);
            if i + 1 < layers {
                x = self.norm(&format!("projector.{}", 3 * i + 1), x, None, true, true);
            }
        }
    }

    /// The value the last node writes (the input for an empty graph).
    pub fn output(&self) -> usize {
        self.channels.len() - 1
    }

    /// The value the global average pool writes: the backbone's features.
    pub fn features(&self) -> Option<usize> {
        self.nodes.iter().find(|n| n.op == Op::AvgPool).map(|n| n.y)
    }

    /// For each value, the last node that reads it (`None` for values nothing reads), so an
    /// interpreter can free activations early.
    pub fn last_use(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.channels.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            last[n.x] = Some(i);
            if let Op::Norm {
                residual: Some(r), ..
            } = n.op
            {
                last[r] = Some(i);
            }
        }
        last
    }

    /// Spatial sizes of every value for an `h`×`w` input; fails when a kernel does not fit its
    /// (padded) input.
    pub fn spatial(&self, h: usize, w: usize) -> Result<Spatial> {
        let mut hw = vec![(0, 0); self.channels.len()];
        hw[0] = (h, w);
        for n in &self.nodes {
            let (h, w) = hw[n.x];
            hw[n.y] = match n.op {
                Op::Conv(c) => {
                    if h + 2 * c.pad < c.k || w + 2 * c.pad < c.k {
                        return Err(Error::InvalidConfig(format!(
                            "{}: a {h}x{w} input is smaller than its {k}x{k} kernel; use larger \
                             images",
                            n.name,
                            k = c.k
                        )));
                    }
                    let s = c.at(h, w);
                    (s.ho(), s.wo())
                }
                Op::MaxPool => ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1),
                Op::Norm { .. } => (h, w),
                Op::AvgPool | Op::Linear { .. } => (1, 1),
            };
        }
        Ok(hw)
    }

    fn push(&mut self, name: String, op: Op, x: usize, channels: usize) -> usize {
        let y = self.channels.len();
        self.channels.push(channels);
        self.nodes.push(Node { name, op, x, y });
        y
    }

    fn conv(&mut self, name: &str, x: usize, out_c: usize, (k, stride, pad): Conv3) -> usize {
        let shape = ConvShape {
            in_c: self.channels[x],
            out_c,
            k,
            stride,
            pad,
        };
        let y = self.push(name.to_string(), Op::Conv(shape), x, out_c);
        self.param_order.push(self.nodes.len() - 1);
        y
    }

    fn norm(
        &mut self,
        name: &str,
        x: usize,
        residual: Option<usize>,
        relu: bool,
        dense: bool,
    ) -> usize {
        let op = Op::Norm {
            residual,
            relu,
            dense,
        };
        let y = self.push(name.to_string(), op, x, self.channels[x]);
        self.param_order.push(self.nodes.len() - 1);
        y
    }

    /// A basic (two 3×3) or bottleneck (1×1, 3×3, 1×1 ×4) block; the stride sits on the 3×3.
    fn block(
        &mut self,
        name: &str,
        bottleneck: bool,
        x: usize,
        planes: usize,
        stride: usize,
    ) -> usize {
        let convs: &[(usize, Conv3)] = if bottleneck {
            &[
                (planes, (1, 1, 0)),
                (planes, (3, stride, 1)),
                (planes * 4, (1, 1, 0)),
            ]
        } else {
            &[(planes, (3, stride, 1)), (planes, (3, 1, 1))]
        };
        let out_c = convs[convs.len() - 1].0;
        let mut h = x;
        for (i, &(c, shape)) in convs.iter().enumerate() {
            h = self.conv(&format!("{name}.conv{}", i + 1), h, c, shape);
            if i + 1 < convs.len() {
                h = self.norm(&format!("{name}.bn{}", i + 1), h, None, true, false);
            }
        }
        let shortcut = if stride != 1 || self.channels[x] != out_c {
            let d = self.conv(&format!("{name}.downsample.0"), x, out_c, (1, stride, 0));
            self.norm(&format!("{name}.downsample.1"), d, None, false, false)
        } else {
            x
        };
        let k = convs.len();
        let y = self.norm(&format!("{name}.bn{k}"), h, Some(shortcut), true, false);
        // A state dict lists the block's last norm before its downsample branch.
        if shortcut != x {
            let n = self.param_order.len();
            self.param_order[n - 3..].rotate_right(1);
        }
        y
    }
}

/// Kernel side, stride and padding of a convolution.
type Conv3 = (usize, usize, usize);

#[cfg(test)]
mod tests {
    use super::*;

    fn names(g: &Graph) -> Vec<&str> {
        g.param_order
            .iter()
            .map(|&i| g.nodes[i].name.as_str())
            .collect()
    }

    #[test]
    fn bottleneck_blocks_list_parameters_in_state_dict_order() {
        let g = Graph::resnet(&ResNetConfig::new(Arch::Resnet50, Stem::Imagenet, 3, 8));
        let n = names(&g);
        assert_eq!(&n[..3], ["conv1", "bn1", "layer1.0.conv1"]);
        let i = n.iter().position(|s| *s == "layer1.0.bn3").unwrap();
        assert_eq!(
            &n[i - 1..i + 4],
            [
                "layer1.0.conv3",
                "layer1.0.bn3",
                "layer1.0.downsample.0",
                "layer1.0.downsample.1",
                "layer1.1.conv1"
            ]
        );
        // Execution order puts the shortcut branch before the norm that adds it.
        let pos = |s: &str| g.nodes.iter().position(|n| n.name == s).unwrap();
        assert!(pos("layer1.0.downsample.1") < pos("layer1.0.bn3"));
        assert_eq!(g.channels[g.output()], 8 * 32);
        assert_eq!(g.param_order.len(), 1 + 1 + 16 * 6 + 4 * 2);
    }

    #[test]
    fn spatial_sizes_follow_strides_and_refuse_tiny_inputs() {
        let cfg = ResNetConfig::new(Arch::Resnet18, Stem::Imagenet, 3, 4);
        let g = Graph::model(&cfg, &[16, 8]);
        let hw = g.spatial(64, 48).unwrap();
        let f = g.features().unwrap();
        // 64×48 → stem /2 → pool /2 → three stride-2 stages: 2×2 (rounded up), then pooled.
        assert_eq!(hw[g.nodes[f - 1].x], (2, 2));
        assert_eq!(hw[g.output()], (1, 1));
        assert_eq!(g.channels[g.output()], 8);
        // Padding lets every kernel fit a 1×1 input; an empty one fits none.
        assert!(g.spatial(1, 1).unwrap().iter().all(|&s| s == (1, 1)));
        assert!(matches!(g.spatial(0, 5), Err(Error::InvalidConfig(_))));
        let last = g.last_use();
        assert_eq!(last[g.output()], None);
        assert!(last[..g.output()].iter().all(Option::is_some));
    }

    #[test]
    fn projector_names_and_widths() {
        let g = Graph::projector(&[32, 64, 64, 16]);
        assert_eq!(
            names(&g),
            [
                "projector.0",
                "projector.1",
                "projector.3",
                "projector.4",
                "projector.6"
            ]
        );
        assert_eq!(g.channels, [32, 64, 64, 64, 64, 16]);
    }
}
