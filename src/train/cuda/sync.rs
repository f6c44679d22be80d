//! Copies from the device back to the host model and optimizer (gradients for checking,
//! weights, running statistics and momentum for checkpoints).

use super::layout::ohwi_to_oihw;
use super::DeviceTrainer;
use crate::cuda::{drv, Act};
use crate::error::{Error, Result};
use crate::nn::Visit;
use crate::train::{BarlowTwins, Lars};
use cudarc::driver::CudaSlice;
use std::collections::HashMap;

impl<A: Act> DeviceTrainer<A> {
    fn download(&self, buf: &CudaSlice<f32>, what: &'static str) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buf).map_err(drv(what))
    }

    /// Copies the parameter gradients of the last step into the host model (CPU layout).
    pub fn gradients_to_host(&self, model: &mut BarlowTwins) -> Result<()> {
        let g = self.download(&self.grad.flat, "reading gradients")?;
        self.scatter(model, &g, |p, v| p.grad = v)
    }

    fn scatter(
        &self,
        model: &mut BarlowTwins,
        flat: &[f32],
        mut put: impl FnMut(&mut crate::nn::Param, Vec<f32>),
    ) -> Result<()> {
        // Check the whole model first, so a mismatch leaves it untouched.
        let mut i = 0;
        let mut ok = true;
        model.params_mut(&mut |p| {
            ok &= self
                .infos
                .get(i)
                .is_some_and(|info| info.name == p.name && info.len == p.value.len());
            i += 1;
        });
        if !ok || i != self.infos.len() {
            return Err(Error::InvalidConfig(
                "the model's parameters do not match the device copy (another model?)".into(),
            ));
        }
        let mut i = 0;
        model.params_mut(&mut |p| {
            let info = &self.infos[i];
            let v = &flat[info.off..info.off + info.len];
            put(
                p,
                if info.is_conv() {
                    ohwi_to_oihw(v, &info.shape)
                } else {
                    v.to_vec()
                },
            );
            i += 1;
        });
        Ok(())
    }

    /// Copies weights, running statistics, batch counts and LARS momentum back into the host
    /// model and optimizer (for checkpoints and anything else that reads them there).
    pub fn sync_to_host(&mut self, model: &mut BarlowTwins, opt: &mut Lars) -> Result<()> {
        let w = self.download(&self.master, "reading parameters")?;
        let mom = self.download(&self.mom, "reading optimizer state")?;
        let run = self.download(&self.running, "reading running statistics")?;
        self.scatter(model, &w, |p, v| p.value = v)?;
        let mut moms = Vec::new();
        self.scatter(model, &mom, |p, v| moms.push((p.name.clone(), v)))?;
        opt.momentum = moms;
        let offsets: HashMap<&str, usize> = self
            .running_names
            .iter()
            .map(|(n, o)| (n.as_str(), *o))
            .collect();
        let forwards = std::mem::take(&mut self.forwards) as f32;
        model.buffers_mut(&mut |b| {
            let (base, part) = match b.name.rsplit_once('.') {
                Some(x) => x,
                None => return,
            };
            let Some(&off) = offsets.get(base) else {
                return;
            };
            let c = b.value.len();
            match part {
                "running_mean" => b.value.copy_from_slice(&run[off..off + c]),
                "running_var" => b.value.copy_from_slice(&run[off + c..off + 2 * c]),
                "num_batches_tracked" => b.value[0] += forwards,
                _ => {}
            }
        });
        Ok(())
    }
}
