//! AdapterFusion weights in responses (`InferRequest.return_fusion_weights`).

use crate::engine::FusionWeights;
use crate::proto;

/// Engine sums to per-slot averages, layer order.
pub fn fusion_weights(list: &[FusionWeights]) -> Vec<proto::FusionWeights> {
    let mut out: Vec<proto::FusionWeights> = list
        .iter()
        .map(|w| proto::FusionWeights {
            layer: w.layer as u32,
            location: w.location.as_str().to_string(),
            adapters: w.adapters.clone(),
            weights: w.means().into_iter().map(|v| v as f32).collect(),
            tokens: w.tokens,
        })
        .collect();
    out.sort_by_key(|w| (w.layer, w.location != "attention"));
    out
}
