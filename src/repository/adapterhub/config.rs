//! `adapter_config.json` of a bottleneck adapter: which configs are supported, with the same
//! defaults and refusals as the Python exporter (`tools/adapterdrop_tools/adapterhub.py`).

use serde_json::{Map, Value};

use super::types::{Activation, Residual, SlotRule};
use crate::repository::manifest::Location;

/// The parts of a bottleneck config that decide shapes and the slot rule.
#[derive(Debug, Clone)]
pub struct BottleneckConfig {
    pub rule: SlotRule,
    pub method: &'static str,
    pub locations: Vec<Location>,
    pub reduction_factor: Value,
    pub leave_out: Vec<usize>,
}

/// BnConfig defaults for keys an (older) checkpoint may omit.
const DEFAULTS: [(&str, bool); 2] = [("original_ln_before", false), ("original_ln_after", true)];
/// Features the slot graphs (and banks) do not implement: any truthy value is refused.
const UNSUPPORTED: [&str; 6] = ["use_gating", "phm_layer", "ln_before", "ln_after", "cross_adapter", "inv_adapter"];

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

fn flag(cfg: &Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match cfg.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("{key}={other} must be true or false")),
    }
}

pub fn parse(cfg: &Value) -> Result<BottleneckConfig, String> {
    let Value::Object(cfg) = cfg else {
        return Err(format!("config is {cfg}: a preset name without its fields is not supported"));
    };
    let arch = cfg.get("architecture");
    if cfg.contains_key("configs") || arch.and_then(Value::as_str) == Some("union") {
        return Err("architecture 'union' (ConfigUnion / MAM / UniPELT) is not supported".into());
    }
    if !matches!(arch, None | Some(Value::Null)) && arch.and_then(Value::as_str) != Some("bottleneck") {
        return Err(format!(
            "architecture={} is not supported (\"bottleneck\" adapters: seq_bn, double_seq_bn, par_bn; \"lora\": LoRA, (IA)^3)",
            arch.cloned().unwrap_or_default()
        ));
    }
    for key in ["mh_adapter", "output_adapter", "reduction_factor", "non_linearity"] {
        if !cfg.contains_key(key) {
            return Err(format!("config lacks required field '{key}'"));
        }
    }
    for key in UNSUPPORTED {
        if truthy(cfg.get(key)) {
            return Err(format!("{key}={} is not supported", cfg[key]));
        }
    }
    let scaling = match cfg.get("scaling") {
        None => 1.0,
        Some(Value::Number(n)) => n.as_f64().filter(|s| s.is_finite()).ok_or_else(|| format!("scaling={n} is not a finite number"))?,
        Some(other) => return Err(format!("scaling={other} is not supported (a number only)")),
    };
    let residual = match cfg.get("residual_before_ln") {
        None | Some(Value::Bool(true)) => Residual::H,
        Some(Value::Bool(false)) => Residual::U,
        Some(Value::String(s)) if s == "post_add" => Residual::HPlusX,
        Some(other) => return Err(format!("residual_before_ln={other} is not supported")),
    };
    let parallel = flag(cfg, "is_parallel", false)?;
    let ln_before = flag(cfg, "original_ln_before", DEFAULTS[0].1)?;
    let ln_after = flag(cfg, "original_ln_after", DEFAULTS[1].1)?;
    // The library's ParallelAdapter ignores `original_ln_before` and `residual_before_ln`: its
    // input is the sub-layer input `x`, its residual the sub-layer output `h`.
    let (ln_before, residual) = if parallel { (false, Residual::H) } else { (ln_before, residual) };
    if residual == Residual::HPlusX && !ln_before {
        return Err("residual_before_ln='post_add' needs original_ln_before=true".into());
    }
    let nl = match &cfg["non_linearity"] {
        Value::String(s) => s.to_lowercase(),
        other => other.to_string(),
    };
    let Some(activation) = Activation::parse(&nl) else {
        return Err(format!(
            "non_linearity={} is not supported (one of gelu, gelu_orig, relu, sigmoid, silu, swish, tanh)",
            cfg["non_linearity"]
        ));
    };
    let mh = flag(cfg, "mh_adapter", false)?;
    let out = flag(cfg, "output_adapter", false)?;
    if !(mh || out) {
        return Err("mh_adapter and output_adapter are both false: no adapter location".into());
    }
    let locations = [(Location::Attention, mh), (Location::Ffn, out)].into_iter().filter(|(_, on)| *on).map(|(l, _)| l).collect();
    let method = match (parallel, mh, out) {
        (true, ..) => "par_bn",
        (_, true, true) => "double_seq_bn",
        (_, false, true) => "seq_bn",
        _ => "bottleneck",
    };
    let leave_out = leave_out(cfg)?;
    let rule = SlotRule { ln_before, ln_after, residual, activation, scaling: scaling as f32, parallel };
    Ok(BottleneckConfig { rule, method, locations, reduction_factor: cfg["reduction_factor"].clone(), leave_out })
}

/// `leave_out`: the layers without adapter weights, sorted.
pub fn leave_out(cfg: &Map<String, Value>) -> Result<Vec<usize>, String> {
    let mut leave_out = match cfg.get("leave_out") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()).ok_or_else(|| format!("leave_out entry {v} is not a layer index")))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(format!("leave_out={other} must be a list of layer indices")),
    };
    leave_out.sort_unstable();
    leave_out.dedup();
    Ok(leave_out)
}

/// Bottleneck width at `layer`: `max(1, hidden // reduction_factor)`; the factor may be a number
/// or a per-layer object with an optional `"default"`.
pub fn bottleneck_size(hidden: usize, rf: &Value, layer: usize) -> Result<usize, String> {
    let rf = match rf {
        Value::Object(per_layer) => per_layer
            .get(&layer.to_string())
            .or_else(|| per_layer.get("default"))
            .ok_or_else(|| format!("reduction_factor object has no entry for layer {layer} and no 'default'"))?,
        other => other,
    };
    let Value::Number(n) = rf else { return Err(format!("reduction_factor={rf} is not supported")) };
    if let Some(i) = n.as_u64() {
        return if i == 0 { Err("reduction_factor=0 is not supported".into()) } else { Ok((hidden / i as usize).max(1)) };
    }
    match n.as_f64() {
        Some(f) if f > 0.0 && f.is_finite() => Ok(((hidden as f64 / f).floor() as usize).max(1)),
        _ => Err(format!("reduction_factor={n} is not supported")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pfeiffer() -> Value {
        json!({"mh_adapter": false, "output_adapter": true, "reduction_factor": 16, "non_linearity": "relu",
               "original_ln_before": true, "original_ln_after": true, "residual_before_ln": true, "scaling": 1.0,
               "is_parallel": false, "use_gating": false, "phm_layer": false, "ln_before": false, "ln_after": false,
               "inv_adapter": null, "cross_adapter": false, "leave_out": [3, 1]})
    }

    #[test]
    fn pfeiffer_and_houlsby_read() {
        let c = parse(&pfeiffer()).unwrap();
        assert_eq!(c.method, "seq_bn");
        assert_eq!(c.locations, vec![Location::Ffn]);
        assert_eq!(c.leave_out, vec![1, 3]);
        assert_eq!(
            c.rule,
            SlotRule {
                ln_before: true,
                ln_after: true,
                residual: Residual::H,
                activation: Activation::Relu,
                scaling: 1.0,
                parallel: false
            }
        );
        let mut h = pfeiffer();
        h["mh_adapter"] = json!(true);
        h["original_ln_before"] = json!(false);
        h["non_linearity"] = json!("Swish");
        h["residual_before_ln"] = json!(false);
        let c = parse(&h).unwrap();
        assert_eq!((c.method, c.rule.activation, c.rule.residual), ("double_seq_bn", Activation::Silu, Residual::U));
        assert_eq!(c.locations, vec![Location::Attention, Location::Ffn]);
    }

    #[test]
    fn parallel_adapters_read_the_sublayer_input() {
        let mut p = pfeiffer();
        p["is_parallel"] = json!(true);
        p["scaling"] = json!(4.0);
        p["residual_before_ln"] = json!("post_add");
        p["original_ln_before"] = json!(false);
        let c = parse(&p).unwrap();
        assert_eq!(c.method, "par_bn");
        assert_eq!(
            c.rule,
            SlotRule {
                ln_before: false,
                ln_after: true,
                residual: Residual::H,
                activation: Activation::Relu,
                scaling: 4.0,
                parallel: true
            }
        );
    }

    #[test]
    fn unsupported_configs_say_why() {
        let cases: [(&str, Value, &str); 8] = [
            ("is_parallel", json!("yes"), "is_parallel"),
            ("use_gating", json!(true), "use_gating"),
            ("inv_adapter", json!("nice"), "inv_adapter"),
            ("scaling", json!("learned"), "scaling"),
            ("residual_before_ln", json!("pre"), "residual_before_ln"),
            ("non_linearity", json!("leakyrelu"), "non_linearity"),
            ("architecture", json!("prefix_tuning"), "architecture"),
            ("output_adapter", json!(false), "no adapter location"),
        ];
        for (key, value, want) in cases {
            let mut c = pfeiffer();
            c[key] = value;
            let err = parse(&c).unwrap_err();
            assert!(err.contains(want), "{key}: {err}");
        }
        assert!(parse(&json!("pfeiffer")).unwrap_err().contains("preset"));
        let mut c = pfeiffer();
        c["residual_before_ln"] = json!("post_add");
        c["original_ln_before"] = json!(false);
        assert!(parse(&c).unwrap_err().contains("post_add"));
        c.as_object_mut().unwrap().remove("non_linearity");
        assert!(parse(&c).unwrap_err().contains("non_linearity"));
    }

    #[test]
    fn bottleneck_sizes_follow_python_floor_division() {
        assert_eq!(bottleneck_size(384, &json!(16), 0).unwrap(), 24);
        assert_eq!(bottleneck_size(32, &json!(3), 0).unwrap(), 10);
        assert_eq!(bottleneck_size(32, &json!(2.5), 0).unwrap(), 12);
        assert_eq!(bottleneck_size(32, &json!(64), 0).unwrap(), 1);
        let per = json!({"1": 4, "default": 16});
        assert_eq!((bottleneck_size(32, &per, 1).unwrap(), bottleneck_size(32, &per, 0).unwrap()), (8, 2));
        assert!(bottleneck_size(32, &json!({"1": 4}), 0).is_err());
        assert!(bottleneck_size(32, &json!(0), 0).is_err());
        assert!(bottleneck_size(32, &json!(-2.0), 0).is_err());
    }
}
