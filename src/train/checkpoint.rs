//! Checkpoints in safetensors: every parameter and buffer under torchvision's names (so a PyTorch
//! user can load the backbone into `torchvision.models.resnet50`), LARS momentum under
//! `optimizer.momentum.<name>`, and the run's state (step, epoch, seed, configurations) as JSON
//! in the metadata. Written atomically; loading checks every name and shape.

use super::lars::Lars;
use crate::error::{Error, Result};
use crate::nn::Visit;
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The metadata key holding the run state.
pub const STATE_KEY: &str = "barlow";

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn f32_tensor(shape: &[usize], v: &[f32]) -> Owned {
    Owned {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Writes `model`, the optimizer state and `state` (JSON) to `path`.
pub fn save(
    path: &Path,
    model: &mut dyn Visit,
    opt: &Lars,
    state: &serde_json::Value,
) -> Result<()> {
    let mut tensors: Vec<(String, Owned)> = Vec::new();
    model.params_mut(&mut |p| tensors.push((p.name.clone(), f32_tensor(&p.shape, &p.value))));
    model.buffers_mut(&mut |b| {
        let t = if b.name.ends_with("num_batches_tracked") {
            // torchvision stores the count as a 0-d int64.
            Owned {
                dtype: Dtype::I64,
                shape: vec![],
                bytes: (b.value[0] as i64).to_le_bytes().to_vec(),
            }
        } else {
            f32_tensor(&b.shape, &b.value)
        };
        tensors.push((b.name.clone(), t));
    });
    // Momentum for every parameter (zeros before the first step).
    let mut i = 0;
    model.params_mut(&mut |p| {
        let t = match opt.momentum.get(i) {
            Some((_, mu)) => f32_tensor(&[mu.len()], mu),
            None => f32_tensor(&[p.value.len()], &vec![0.0; p.value.len()]),
        };
        tensors.push((format!("optimizer.momentum.{}", p.name), t));
        i += 1;
    });
    let meta = HashMap::from([(STATE_KEY.to_string(), state.to_string())]);
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| Error::Checkpoint {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
    crate::io::write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
}

/// A checkpoint read into memory.
pub struct Loaded {
    /// The file it was read from, for error messages.
    pub path: String,
    tensors: HashMap<String, (Vec<usize>, Dtype, Vec<f32>)>,
    /// The run state saved with it.
    pub state: serde_json::Value,
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Loaded> {
    let p = path.display().to_string();
    let bad = |reason: String| Error::Checkpoint {
        path: p.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state_text = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| {
            bad("no barlow run state in the metadata (not written by barlow?)".into())
        })?;
    let state = serde_json::from_str(state_text).map_err(|e| bad(format!("run state: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => return Err(bad(format!("tensor {name} has unsupported type {other:?}"))),
        };
        tensors.insert(name, (view.shape().to_vec(), view.dtype(), data));
    }
    Ok(Loaded {
        path: p,
        tensors,
        state,
    })
}

/// The run state of the checkpoint at `path`, read from its header alone (the tensors are not
/// read).
pub fn read_state(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let bad = |reason: String| Error::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let len = u64::from_le_bytes(len);
    // safetensors refuses headers above 100 MB as well.
    if len > 100_000_000 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let text = header["__metadata__"][STATE_KEY].as_str().ok_or_else(|| {
        bad("no barlow run state in the metadata (not written by barlow?)".into())
    })?;
    serde_json::from_str(text).map_err(|e| bad(format!("run state: {e}")))
}

impl Loaded {
    /// The tensor `name`, checked against what the model holds there: its shape, its type
    /// (f32, or the int64 count torchvision keeps for `num_batches_tracked`) and finite values.
    fn take(&self, name: &str, shape: &[usize]) -> Result<&Vec<f32>> {
        let bad = |reason: String| Error::Checkpoint {
            path: self.path.clone(),
            reason: format!("tensor {name}: {reason}"),
        };
        let (have, dtype, v) = self
            .tensors
            .get(name)
            .ok_or_else(|| bad("missing (a different architecture?)".into()))?;
        let count = name.ends_with("num_batches_tracked");
        let (want_shape, want_type): (&[usize], Dtype) = if count {
            (&[], Dtype::I64)
        } else {
            (shape, Dtype::F32)
        };
        if *dtype != want_type {
            return Err(bad(format!(
                "type {dtype:?}, the model expects {want_type:?}"
            )));
        }
        if have.as_slice() != want_shape {
            return Err(bad(format!(
                "shape {have:?}, the model expects {want_shape:?}"
            )));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!(
                "value {i} is {} (the run it came from diverged?)",
                v[i]
            )));
        }
        Ok(v)
    }

    /// Copies every parameter and buffer into `model` (all must be present, with their sizes).
    pub fn restore_model(&self, model: &mut dyn Visit) -> Result<()> {
        let mut err = None;
        model.params_mut(&mut |p| match self.take(&p.name, &p.shape) {
            Ok(v) => p.value.copy_from_slice(v),
            Err(e) => {
                err.get_or_insert(e);
            }
        });
        model.buffers_mut(&mut |b| match self.take(&b.name, &b.shape) {
            Ok(v) if v.len() == b.value.len() => b.value.copy_from_slice(v),
            Ok(_) => {
                err.get_or_insert(Error::Checkpoint {
                    path: self.path.clone(),
                    reason: format!("tensor {}: wrong number of values", b.name),
                });
            }
            Err(e) => {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Restores LARS momentum for every parameter of `model`.
    pub fn restore_optimizer(&self, model: &mut dyn Visit, opt: &mut Lars) -> Result<()> {
        let mut err = None;
        let mut momentum = Vec::new();
        model.params_mut(&mut |p| match self
            .take(&format!("optimizer.momentum.{}", p.name), &[p.value.len()])
        {
            Ok(v) => momentum.push((p.name.clone(), v.clone())),
            Err(e) => {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        opt.momentum = momentum;
        Ok(())
    }
}
