//! The device plan: the model's graph with parameter offsets and spatial sizes, the flat
//! parameter layout, the running statistics, and which gradient writes add to an earlier one.

use super::layout::oihw_to_ohwi;
use crate::error::{Error, Result};
use crate::nn::graph::{Graph, Op as GraphOp};
use crate::nn::{ConvSpec, Visit};
use crate::train::{BarlowTwins, Lars};
use std::collections::HashMap;

/// An activation buffer's shape per image: `rows` positions (H·W, or 1 for features) of `c`
/// channels.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) rows: usize,
    pub(super) c: usize,
}

impl Slot {
    pub(super) fn per_image(&self) -> usize {
        self.rows * self.c
    }
}

/// What a node of the network does. Slots index activations; `p` indexes the parameter table.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Conv {
        spec: ConvSpec,
        p: usize,
    },
    /// Batch norm (γ at parameter `p`, β at `p + 1`), then `+ residual`, then ReLU. `dense`
    /// marks the projector's norms over N×C features, which run on the loss's standardization
    /// kernel (its affine variant) in training.
    Norm {
        p: usize,
        running: usize,
        stats: usize,
        residual: Option<usize>,
        relu: bool,
        dense: bool,
    },
    MaxPool {
        h: usize,
        w: usize,
    },
    AvgPool,
    Linear {
        p: usize,
        inp: usize,
        out: usize,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) op: Op,
    pub(super) x: usize,
    pub(super) y: usize,
    /// Whether this node's input gradient (and the residual's) adds to one already written by a
    /// later node: decided once, from the graph, so every gradient is written before it is added.
    pub(super) acc_x: bool,
    pub(super) acc_res: bool,
}

/// One parameter tensor of the flat arrays.
#[derive(Debug, Clone)]
pub(super) struct ParamInfo {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) off: usize,
    pub(super) len: usize,
}

impl ParamInfo {
    pub(super) fn is_conv(&self) -> bool {
        self.shape.len() == 4
    }
}

pub(super) fn internal(what: String) -> Error {
    Error::InvalidConfig(format!("internal: {what}"))
}

/// Everything about the device copy that the host decides: the flat parameter layout (device
/// order and layout), the running statistics, and the graph.
pub(super) struct HostPlan {
    pub(super) infos: Vec<ParamInfo>,
    pub(super) host: Vec<f32>,
    pub(super) moms: Vec<f32>,
    pub(super) run_host: Vec<f32>,
    pub(super) running: HashMap<String, usize>,
    pub(super) slots: Vec<Slot>,
    pub(super) nodes: Vec<Node>,
    pub(super) feat: usize,
    pub(super) z_slot: usize,
    pub(super) norms: usize,
}

/// Elements between weight-tensor boundaries in the flat parameter arrays.
pub(super) const WEIGHT_ALIGN: usize = 64;

pub(super) fn plan(
    model: &mut BarlowTwins,
    opt: &Lars,
    image: (usize, usize, usize),
) -> Result<HostPlan> {
    let cfg = model.config.clone();
    // Parameter table, in the model's visiting order (so a norm's β follows its γ).
    let mut infos = Vec::new();
    let mut host = Vec::new();
    let mut moms = Vec::new();
    let mut names = HashMap::new();
    let momentum: HashMap<&str, &Vec<f32>> =
        opt.momentum.iter().map(|(n, v)| (n.as_str(), v)).collect();
    model.params_mut(&mut |p| {
        // Weight matrices and filters start on a WEIGHT_ALIGN-element boundary (256 bytes of f32,
        // 128 of bf16): cuBLAS and cuDNN pick their vectorized paths by operand alignment. A norm's
        // γ and β stay adjacent (the kernels read them as one 2·C array).
        if p.shape.len() > 1 {
            let pad = host.len().next_multiple_of(WEIGHT_ALIGN) - host.len();
            host.extend(std::iter::repeat_n(0f32, pad));
            moms.extend(std::iter::repeat_n(0f32, pad));
        }
        let off = host.len();
        let conv = p.shape.len() == 4;
        let put = |v: &[f32]| {
            if conv {
                oihw_to_ohwi(v, &p.shape)
            } else {
                v.to_vec()
            }
        };
        host.extend(put(&p.value));
        match momentum.get(p.name.as_str()) {
            Some(m) if m.len() == p.value.len() => moms.extend(put(m)),
            _ => moms.extend(std::iter::repeat_n(0f32, p.value.len())),
        }
        names.insert(p.name.clone(), infos.len());
        infos.push(ParamInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            off,
            len: p.value.len(),
        });
    });
    // Running statistics: [mean | var] per norm, by the norm's name.
    let mut run_host = Vec::new();
    let mut running = HashMap::new();
    let mut pending_mean: Option<(String, Vec<f32>)> = None;
    let mut run_err = None;
    model.buffers_mut(&mut |b| {
        if let Some(base) = b.name.strip_suffix(".running_mean") {
            pending_mean = Some((base.to_string(), b.value.clone()));
        } else if let Some(base) = b.name.strip_suffix(".running_var") {
            match pending_mean.take() {
                Some((m, mean)) if m == base => {
                    running.insert(m, run_host.len());
                    run_host.extend(mean);
                    run_host.extend_from_slice(&b.value);
                }
                _ => {
                    run_err.get_or_insert(internal(format!("{}: no running mean", b.name)));
                }
            }
        }
    });
    if let Some(e) = run_err {
        return Err(e);
    }

    // The device nodes: the model's graph, with parameter offsets and spatial sizes.
    let (_, h, w) = image;
    let graph = Graph::model(&cfg.backbone, &cfg.projector);
    let hw = graph.spatial(h, w)?;
    let slots: Vec<Slot> = graph
        .channels
        .iter()
        .zip(&hw)
        .map(|(&c, &(h, w))| Slot { rows: h * w, c })
        .collect();
    let param = |name: &str, shape: &[usize]| -> Result<usize> {
        let p = *names
            .get(name)
            .ok_or_else(|| internal(format!("the model has no parameter {name}")))?;
        if infos[p].shape != shape {
            return Err(internal(format!(
                "{name} has shape {:?}, the graph expects {shape:?}",
                infos[p].shape
            )));
        }
        Ok(p)
    };
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    let mut norms = 0;
    for nd in &graph.nodes {
        let name = &nd.name;
        let op = match nd.op {
            GraphOp::Conv(c) => Op::Conv {
                spec: c.at(hw[nd.x].0, hw[nd.x].1),
                p: param(&format!("{name}.weight"), &[c.out_c, c.in_c, c.k, c.k])?,
            },
            GraphOp::Norm {
                residual,
                relu,
                dense,
            } => {
                let c = graph.channels[nd.x];
                let p = param(&format!("{name}.weight"), &[c])?;
                if names.get(&format!("{name}.bias")) != Some(&(p + 1))
                    || infos[p + 1].off != infos[p].off + c
                {
                    return Err(internal(format!("{name}: bias does not follow weight")));
                }
                let running = *running
                    .get(name.as_str())
                    .ok_or_else(|| internal(format!("{name}: no running statistics")))?;
                norms += 1;
                Op::Norm {
                    p,
                    running,
                    stats: norms - 1,
                    residual,
                    relu,
                    dense,
                }
            }
            GraphOp::MaxPool => Op::MaxPool {
                h: hw[nd.x].0,
                w: hw[nd.x].1,
            },
            GraphOp::AvgPool => Op::AvgPool,
            GraphOp::Linear { inp, out } => {
                if names.contains_key(&format!("{name}.bias")) {
                    return Err(internal(format!("{name}: linear biases are not supported")));
                }
                Op::Linear {
                    p: param(&format!("{name}.weight"), &[out, inp])?,
                    inp,
                    out,
                }
            }
        };
        nodes.push(Node {
            op,
            x: nd.x,
            y: nd.y,
            acc_x: false,
            acc_res: false,
        });
    }
    let feat = graph
        .features()
        .ok_or_else(|| internal("the graph has no features".into()))?;
    let z_slot = graph.output();
    mark_accumulation(&mut nodes, slots.len())?;

    Ok(HostPlan {
        infos,
        host,
        moms,
        run_host,
        running,
        slots,
        nodes,
        feat,
        z_slot,
        norms,
    })
}

/// Walks the graph backward and marks, for each gradient contribution, whether one was written
/// before it. Nodes that can only write (norm, pooling inputs) must be their input's sole
/// consumer.
pub(super) fn mark_accumulation(nodes: &mut [Node], slots: usize) -> Result<()> {
    let mut written = vec![false; slots];
    for nd in nodes.iter_mut().rev() {
        if let Op::Norm {
            residual: Some(r), ..
        } = nd.op
        {
            nd.acc_res = written[r];
            written[r] = true;
        }
        if nd.x == 0 {
            continue;
        }
        nd.acc_x = written[nd.x];
        written[nd.x] = true;
        let write_only = matches!(nd.op, Op::Norm { .. } | Op::MaxPool { .. } | Op::AvgPool);
        if write_only && nd.acc_x {
            return Err(internal(format!(
                "slot {} feeds a norm or pool and another node",
                nd.x
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::resnet::{Arch, ResNetConfig, Stem};
    use crate::rng::Rng;
    use crate::train::{LarsConfig, ModelConfig};

    fn model(arch: Arch, stem: Stem, width: usize) -> BarlowTwins {
        let cfg = ModelConfig {
            backbone: ResNetConfig {
                arch,
                stem,
                in_channels: 3,
                width,
            },
            projector: vec![12, 10, 6],
            lambda: 0.0051,
        };
        BarlowTwins::new(cfg, &mut Rng::new(3)).unwrap()
    }

    /// Every parameter is read by exactly one node, every norm's running statistics by one
    /// norm, and every activation gradient is written once before anything adds to it.
    fn check_plan(m: &mut BarlowTwins, image: (usize, usize, usize)) -> HostPlan {
        let p = plan(m, &Lars::new(LarsConfig::default()), image).unwrap();
        for i in p.infos.iter().filter(|i| i.shape.len() > 1) {
            assert_eq!(i.off % WEIGHT_ALIGN, 0, "{} at element {}", i.name, i.off);
        }
        let mut used = vec![0; p.infos.len()];
        let mut runs = Vec::new();
        for nd in &p.nodes {
            match &nd.op {
                Op::Conv { p: i, .. } | Op::Linear { p: i, .. } => used[*i] += 1,
                Op::Norm { p: i, running, .. } => {
                    used[*i] += 1;
                    used[*i + 1] += 1;
                    runs.push(*running);
                }
                _ => {}
            }
        }
        assert!(
            used.iter().all(|&u| u == 1),
            "parameter use counts {used:?}"
        );
        runs.sort();
        runs.dedup();
        assert_eq!(runs.len(), p.running.len());
        assert_eq!(p.norms, p.running.len());
        // Walk backward: the first contribution to each slot writes, later ones add.
        let mut seen = vec![false; p.slots.len()];
        for nd in p.nodes.iter().rev() {
            if let Op::Norm {
                residual: Some(r), ..
            } = nd.op
            {
                assert_eq!(nd.acc_res, seen[r]);
                seen[r] = true;
            }
            if nd.x != 0 {
                assert_eq!(nd.acc_x, seen[nd.x]);
                seen[nd.x] = true;
            }
        }
        // Every slot but the input and z feeds something backward.
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(*s, i != 0 && i != p.z_slot, "slot {i}");
        }
        p
    }

    #[test]
    fn graphs_use_every_parameter_once_and_write_before_adding() {
        let mut m = model(Arch::Resnet18, Stem::Small, 4);
        let p = check_plan(&mut m, (3, 8, 8));
        // The projector's two norms, and only they, run on the standardization kernel.
        let dense = p
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Norm { dense: true, .. }))
            .count();
        assert_eq!(dense, 2);
        assert_eq!(p.slots[p.feat].c, 32);
        assert_eq!(p.slots[p.z_slot].c, 6);
        // Small stem keeps 8×8, three stride-2 stages: 1×1 before the pool.
        let last_conv = p.nodes.iter().rev().find_map(|n| match n.op {
            Op::Conv { spec, .. } => Some(spec),
            _ => None,
        });
        assert_eq!(last_conv.map(|s| (s.ho(), s.wo())), Some((1, 1)));

        let mut m = model(Arch::Resnet50, Stem::Imagenet, 2);
        let p = check_plan(&mut m, (3, 32, 32));
        assert_eq!(p.slots[p.feat].c, 64);
        assert_eq!(
            p.nodes
                .iter()
                .filter(|n| matches!(n.op, Op::MaxPool { .. }))
                .count(),
            1
        );
        // 53 convolutions (49 + stem + 4 downsample... of which the stem is one), 3 linears.
        let convs = p
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Conv { .. }))
            .count();
        assert_eq!(convs, 53);
        // The first block's input (after the max-pool) feeds conv1 and the downsample conv.
        let pooled = p
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::MaxPool { .. }))
            .unwrap()
            .y;
        assert_eq!(p.nodes.iter().filter(|n| n.x == pooled).count(), 2);
    }
}
