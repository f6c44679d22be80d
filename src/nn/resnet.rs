//! ResNet-18/50 (torchvision's topology and parameter names) and the Barlow Twins projector, on
//! the CPU: the layers of [`crate::nn`] run in the order of the model's [`Graph`].

use super::graph::{Graph, Op};
use super::layers::{global_avg_pool, global_avg_pool_backward};
use super::{
    Backend, BatchNorm, Buffer, Conv2d, Linear, MaxPool, Param, PlaneMoments, Tensor, Visit,
};
use crate::rng::Rng;
use std::sync::Arc;

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

/// The CPU layer of one graph node.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    /// A norm, with its shortcut's add and its ReLU fused.
    Norm(Box<BatchNorm>),
    MaxPool(MaxPool),
    /// The shapes pooled by training forwards, for the backward.
    AvgPool(Vec<Vec<usize>>),
    Linear(Linear),
}

/// A graph and one layer per node: the forward walks the nodes in order, freeing each
/// activation after its last reader; the backward walks them in reverse, adding the gradients
/// of values read twice (a block's input feeds its branch and its shortcut).
#[derive(Debug, Clone)]
struct Network {
    graph: Graph,
    layers: Vec<Layer>,
    last_use: Vec<Option<usize>>,
}

impl Network {
    /// Layers initialized in node order (so the random draws follow it): Kaiming-normal
    /// convolutions, norms at γ = 1 except a residual block's last (γ = 0, zero_init_residual:
    /// each block starts as the identity).
    fn new(graph: Graph, rng: &mut Rng) -> Self {
        let layers = graph
            .nodes
            .iter()
            .map(|n| match n.op {
                Op::Conv(c) => Layer::Conv(Conv2d::new(
                    &n.name, c.in_c, c.out_c, c.k, c.stride, c.pad, rng,
                )),
                Op::Norm { residual, .. } => {
                    let gamma = if residual.is_some() { 0.0 } else { 1.0 };
                    let bn = BatchNorm::new(&n.name, graph.channels[n.y], gamma);
                    Layer::Norm(Box::new(bn))
                }
                Op::MaxPool => Layer::MaxPool(MaxPool::default()),
                Op::AvgPool => Layer::AvgPool(Vec::new()),
                Op::Linear { inp, out } => {
                    Layer::Linear(Linear::new(&n.name, inp, out, false, rng))
                }
            })
            .collect();
        let last_use = graph.last_use();
        Self {
            graph,
            layers,
            last_use,
        }
    }

    fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        // Values are shared, not copied, between the nodes that read them and the caches that
        // keep them for the backward.
        let mut values: Vec<Option<Arc<Tensor>>> = vec![None; self.graph.channels.len()];
        // A training convolution's output comes with its per-plane moments for the norm after it.
        let mut moments: Vec<Option<PlaneMoments>> = vec![None; values.len()];
        values[0] = Some(Arc::new(x.clone()));
        for (i, (n, layer)) in self.graph.nodes.iter().zip(&mut self.layers).enumerate() {
            let get = |v: usize| values[v].as_ref().expect("value computed");
            let input = get(n.x);
            let y = match (layer, n.op) {
                (Layer::Conv(c), _) => {
                    let mut mo = train.then(PlaneMoments::default);
                    let y = c.forward_shared(be, input, train, mo.as_mut());
                    moments[n.y] = mo;
                    Arc::new(y)
                }
                (Layer::Norm(bn), Op::Norm { residual, relu, .. }) => {
                    let res = residual.map(|r| get(r).as_ref());
                    let mo = moments[n.x].take();
                    bn.forward_shared(be, input, mo.as_ref(), res, relu, train)
                }
                (Layer::MaxPool(mp), _) => Arc::new(mp.forward(input, train)),
                (Layer::AvgPool(shapes), _) => {
                    if train {
                        shapes.push(input.shape.clone());
                    }
                    Arc::new(global_avg_pool(input))
                }
                (Layer::Linear(l), _) => Arc::new(l.forward(be, input, train)),
                (Layer::Norm(..), _) => unreachable!("a norm layer stands for a norm node"),
            };
            values[n.y] = Some(y);
            for (v, last) in values.iter_mut().zip(&self.last_use) {
                if *last == Some(i) {
                    *v = None;
                }
            }
        }
        let out = values[self.graph.output()]
            .take()
            .expect("the output is computed");
        Arc::try_unwrap(out).unwrap_or_else(|o| (*o).clone())
    }

    /// Backward from dL/d(output); parameter gradients accumulate. Returns dL/d(input) when
    /// `need_dx` (the first layer skips it otherwise).
    fn backward(&mut self, be: &dyn Backend, dy: Tensor, need_dx: bool) -> Option<Tensor> {
        let mut grads: Vec<Option<Tensor>> = vec![None; self.graph.channels.len()];
        grads[self.graph.output()] = Some(dy);
        let add = |grads: &mut [Option<Tensor>], v: usize, g: Tensor| match &mut grads[v] {
            Some(acc) => add_assign(acc, &g),
            slot => *slot = Some(g),
        };
        for (n, layer) in self.graph.nodes.iter().zip(&mut self.layers).rev() {
            let g = grads[n.y].take().expect("every value feeds the output");
            let want = n.x != 0 || need_dx;
            let dx = match (layer, n.op) {
                (Layer::Conv(c), _) => c.backward(be, &g, want),
                (Layer::Norm(bn), Op::Norm { residual, .. }) => {
                    let (dx, g) = bn.backward_owned(be, g);
                    if let Some(res) = residual {
                        add(&mut grads, res, g);
                    }
                    Some(dx)
                }
                (Layer::MaxPool(mp), _) => Some(mp.backward(&g)),
                (Layer::AvgPool(shapes), _) => {
                    let shape = shapes.pop().expect("backward without a training forward");
                    Some(global_avg_pool_backward(&g, &shape))
                }
                (Layer::Linear(l), _) => l.backward(be, &g, want),
                (Layer::Norm(..), _) => unreachable!("a norm layer stands for a norm node"),
            };
            if let Some(dx) = dx.filter(|_| want) {
                add(&mut grads, n.x, dx);
            }
        }
        grads[0].take()
    }
}

impl Visit for Network {
    /// State-dict order: a block's `downsample` after its last norm.
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for &i in &self.graph.param_order {
            match &mut self.layers[i] {
                Layer::Conv(c) => f(&mut c.weight),
                Layer::Norm(bn) => bn.visit(f),
                Layer::Linear(l) => l.visit(f),
                Layer::MaxPool(_) | Layer::AvgPool(_) => {}
            }
        }
    }

    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        for &i in &self.graph.param_order {
            if let Layer::Norm(bn) = &mut self.layers[i] {
                bn.visit_buffers(f);
            }
        }
    }
}

/// A ResNet backbone without its classifier (`fc` is the identity, as in Barlow Twins).
#[derive(Debug, Clone)]
pub struct ResNet {
    /// The shape it was built with.
    pub config: ResNetConfig,
    net: Network,
}

impl ResNet {
    /// A freshly initialized backbone with torchvision's parameter names.
    pub fn new(config: ResNetConfig, rng: &mut Rng) -> Self {
        Self {
            config,
            net: Network::new(Graph::resnet(&config), rng),
        }
    }

    /// Images [N, C, H, W] → features [N, F].
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        self.net.forward(be, x, train)
    }

    /// Backward from dL/dfeatures; parameter gradients accumulate. The input gradient is not
    /// needed, so the first convolution skips it.
    pub fn backward(&mut self, be: &dyn Backend, dfeat: &Tensor) {
        self.net.backward(be, dfeat.clone(), false);
    }
}

impl Visit for ResNet {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.net.params_mut(f);
    }

    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        self.net.buffers_mut(f);
    }
}

/// The projector: Linear → BN → ReLU → Linear → BN → ReLU → Linear, no biases on the linears,
/// named as the reference code's `nn.Sequential` (`projector.0`, `.1`, `.3`, `.4`, `.6`).
#[derive(Debug, Clone)]
pub struct Projector {
    net: Network,
}

impl Projector {
    /// `sizes` = [features, hidden…, out], e.g. [2048, 8192, 8192, 8192].
    pub fn new(sizes: &[usize], rng: &mut Rng) -> Self {
        Self {
            net: Network::new(Graph::projector(sizes), rng),
        }
    }

    /// Features [N, F] → projections [N, out]; a training forward caches for the backward.
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        self.net.forward(be, x, train)
    }

    /// Backward from dL/dprojections; parameter gradients accumulate. Returns dL/dfeatures.
    pub fn backward(&mut self, be: &dyn Backend, dz: &Tensor) -> Tensor {
        self.net
            .backward(be, dz.clone(), true)
            .expect("the input gradient was requested")
    }
}

impl Visit for Projector {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.net.params_mut(f);
    }

    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        self.net.buffers_mut(f);
    }
}

fn add_assign(a: &mut Tensor, b: &Tensor) {
    use rayon::prelude::*;
    a.data
        .par_iter_mut()
        .zip(b.data.par_iter())
        .for_each(|(x, y)| *x += y);
}
