//! The Barlow Twins model: a ResNet backbone, the projector, and the library's fused loss.

use super::parallel::SyncBackend;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::nn::resnet::{Projector, ResNet, ResNetConfig};
use crate::nn::{Backend, Buffer, Param, Tensor, Visit};
use crate::rng::Rng;
use crate::{BarlowTwinsLoss, Dims, LossConfig, LossValue};

/// Backbone and projector shapes, and the loss's λ.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ModelConfig {
    /// The ResNet backbone's shape.
    pub backbone: ResNetConfig,
    /// Projector widths after the backbone's features (paper: 8192, 8192, 8192).
    pub projector: Vec<usize>,
    /// Weight λ of the loss's off-diagonal (redundancy-reduction) term; the paper uses 0.0051.
    pub lambda: f32,
}

setters!(ModelConfig {
    backbone: ResNetConfig,
    projector: Vec<usize>,
    lambda: f32,
});

impl ModelConfig {
    /// `backbone` and a projector of `projector` widths, with the paper's λ = 0.0051.
    pub fn new(backbone: ResNetConfig, projector: Vec<usize>) -> Self {
        Self {
            backbone,
            projector,
            lambda: 0.0051,
        }
    }

    /// Sizes a model can be built with, checked before anything is allocated for them (they may
    /// come from a checkpoint's metadata): 1 or 3 input channels, a width of 1 to 1024, 1 to 8
    /// projector layers of 1 to 65,536 units, and parameters (with gradients and momentum) that
    /// fit in the memory the machine has.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        let b = &self.backbone;
        if !matches!(b.in_channels, 1 | 3) {
            return bad(format!(
                "{} input channels (1 or 3 are supported)",
                b.in_channels
            ));
        }
        if !(1..=1024).contains(&b.width) {
            return bad(format!("width {} (1 to 1024)", b.width));
        }
        if self.projector.is_empty()
            || self.projector.len() > 8
            || self.projector.iter().any(|&p| !(1..=1 << 16).contains(&p))
        {
            return bad(format!(
                "projector {:?} (1 to 8 layers of 1 to 65536 units)",
                self.projector
            ));
        }
        // ResNet-50 at width 64 holds about 23.5 M weights, and they grow with width².
        let w = b.width as f64 / 64.0;
        let mut params = 23.5e6 * w * w;
        let mut prev = b.features() as f64;
        for &p in &self.projector {
            params += prev * p as f64;
            prev = p as f64;
        }
        // Values, gradients, momentum and a working copy, in f32.
        let bytes = params * 16.0;
        if crate::io::available_memory().is_some_and(|free| bytes > free as f64) {
            return Err(Error::OutOfHostMemory {
                during: format!(
                    "building a model of about {:.0} M parameters (lower --projector or --width)",
                    params / 1e6
                ),
                bytes: bytes as usize,
            });
        }
        Ok(())
    }
}

/// Backbone + projector, trained by the Barlow Twins loss on two views.
pub struct BarlowTwins {
    /// The shapes it was built with.
    pub config: ModelConfig,
    /// The ResNet, whose features are what the model is trained for.
    pub backbone: ResNet,
    /// The MLP from backbone features to the embeddings the loss compares.
    pub projector: Projector,
    loss: BarlowTwinsLoss,
}

impl BarlowTwins {
    /// A freshly initialized model; fails when `config` does not pass [`ModelConfig::check`].
    pub fn new(config: ModelConfig, rng: &mut Rng) -> Result<Self> {
        config.check()?;
        let backbone = ResNet::new(config.backbone, rng);
        let mut sizes = vec![config.backbone.features()];
        sizes.extend_from_slice(&config.projector);
        let projector = Projector::new(&sizes, rng);
        let loss = BarlowTwinsLoss::new(LossConfig {
            lambda: config.lambda,
            ..Default::default()
        })?;
        Ok(Self {
            config,
            backbone,
            projector,
            loss,
        })
    }

    /// One training step's forward and backward on two views of the same images: each view is
    /// its own batch (its own BatchNorm statistics), the loss is the library's fused loss, and
    /// the gradients are left in the parameters for the optimizer.
    pub fn forward_backward(
        &mut self,
        be: &dyn Backend,
        y1: &Tensor,
        y2: &Tensor,
    ) -> Result<LossValue> {
        self.params_mut(&mut |p| p.zero_grad());
        let z1 = {
            let f = self.backbone.forward(be, y1, true);
            self.projector.forward(be, &f, true)
        };
        let z2 = {
            let f = self.backbone.forward(be, y2, true);
            self.projector.forward(be, &f, true)
        };
        let dims = Dims::new(z1.shape[0], z1.shape[1]);
        let mut dz1 = Tensor::zeros(&z1.shape);
        let mut dz2 = Tensor::zeros(&z2.shape);
        let value = self.loss.forward_backward_cpu(
            &z1.data,
            &z2.data,
            dims,
            &mut dz1.data,
            &mut dz2.data,
        )?;
        // Last in, first out: the second view's caches are on top.
        let df2 = self.projector.backward(be, &dz2);
        self.backbone.backward(be, &df2);
        let df1 = self.projector.backward(be, &dz1);
        self.backbone.backward(be, &df1);
        Ok(value)
    }

    /// [`BarlowTwins::forward_backward`] for one rank of a data-parallel group: `y1`, `y2` are
    /// this rank's share of the batch (every rank the same size). Batch norms are synchronized
    /// over the group, the loss is the whole batch's, and the parameter gradients are summed over
    /// the ranks: every rank ends with the gradients one rank would have for all the images.
    /// Every rank of the group must make the same call.
    pub fn forward_backward_across(
        &mut self,
        be: &dyn Backend,
        group: &dyn Collective,
        y1: &Tensor,
        y2: &Tensor,
    ) -> Result<LossValue> {
        let sync = SyncBackend::new(be, group);
        self.params_mut(&mut |p| p.zero_grad());
        let z1 = {
            let f = self.backbone.forward(&sync, y1, true);
            self.projector.forward(&sync, &f, true)
        };
        let z2 = {
            let f = self.backbone.forward(&sync, y2, true);
            self.projector.forward(&sync, &f, true)
        };
        let dims = Dims::new(z1.shape[0], z1.shape[1]);
        let mut dz1 = Tensor::zeros(&z1.shape);
        let mut dz2 = Tensor::zeros(&z2.shape);
        let value = self.loss.forward_backward_cpu_across(
            group,
            &z1.data,
            &z2.data,
            dims,
            &mut dz1.data,
            &mut dz2.data,
        )?;
        let df2 = self.projector.backward(&sync, &dz2);
        self.backbone.backward(&sync, &df2);
        let df1 = self.projector.backward(&sync, &dz1);
        self.backbone.backward(&sync, &df1);
        sync.finish()?;
        // One all-reduce of every gradient, in the visiting order.
        let mut flat = Vec::new();
        self.params_mut(&mut |p| flat.extend_from_slice(&p.grad));
        group.all_reduce_sum_f32(&mut flat)?;
        let mut at = 0;
        self.params_mut(&mut |p| {
            let len = p.grad.len();
            p.grad.copy_from_slice(&flat[at..at + len]);
            at += len;
        });
        Ok(value)
    }

    /// Backbone features in evaluation mode (running BatchNorm statistics).
    pub fn features(&mut self, be: &dyn Backend, x: &Tensor) -> Tensor {
        self.backbone.forward(be, x, false)
    }
}

impl Visit for BarlowTwins {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.backbone.params_mut(f);
        self.projector.params_mut(f);
    }

    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer)) {
        self.backbone.buffers_mut(f);
        self.projector.buffers_mut(f);
    }
}
