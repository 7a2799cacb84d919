//! The host head (`engine::heads`, from the task's AdapterHub weights) agrees with the task's
//! `head.onnx` run by ONNX Runtime within 1e-6 x max(1, largest |logit|) for every task of the test repository (BERT-tiny,
//! RoBERTa-tiny, tiny-random, MiniLM; classification and regression), on first-token states of the
//! scale a real last layer has (LayerNorm output: mean 0, variance 1). Absolute 1e-6 is not a bound
//! f32 can keep: one ulp of a logit near 10 (random MiniLM heads reach 9.6) is 9.5e-7, and ORT's own
//! f32 Gemm is ~4 ulps from the exactly rounded value there (measured against an f64 head).

mod common;

use adapterdrop_serve::config::Settings;
use adapterdrop_serve::engine::heads::{head_logits, head_logits_on_rows};
use adapterdrop_serve::server::App;
use ndarray::{Array2, Array3, Axis};
use ort::value::TensorRef;

const TOL: f32 = 1e-6;

#[test]
fn host_heads_equal_head_onnx() {
    let mut settings = Settings::default();
    settings.repository.path = common::test_repo();
    settings.runtime.library_path = Some(common::ort_library());
    settings.runtime.intra_threads = 1;
    let app = App::load(settings).unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    for entry in app.registry.entries() {
        let Some(task) = entry.task else { continue };
        let Some(w) = task.adapterhub.as_ref() else { continue };
        let h = task.backbone.manifest.hidden_size;
        let (rows, tokens) = (37, 3);
        // Deterministic, LayerNorm-like states: zero mean and unit variance over H per token.
        let mut hidden = Array3::from_shape_fn((rows, tokens, h), |(i, j, k)| ((i * 7919 + j * 104_729 + k * 31) as f32 * 0.013).sin());
        for mut v in hidden.lanes_mut(Axis(2)) {
            let mean = v.mean().unwrap();
            v -= mean;
            let sd = (v.mapv(|x| x * x).mean().unwrap() + 1e-12).sqrt();
            v /= sd;
        }
        let onnx: Array2<f32> = task
            .head
            .as_ref()
            .expect("exported tasks have head.onnx")
            .run(vec![("hidden", TensorRef::from_array_view(hidden.view()).unwrap().into())], |o| {
                Ok(o["logits"].try_extract_array::<f32>()?.to_owned().into_dimensionality().unwrap())
            })
            .unwrap();
        let host = head_logits(&w.head, hidden.slice(ndarray::s![.., 0, ..]));
        assert_eq!(host.shape(), onnx.shape(), "{}", task.name());
        let diff = host.iter().zip(onnx.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = onnx.iter().fold(1f32, |m, v| m.max(v.abs()));
        assert!(diff <= TOL * scale, "{}: host head differs from head.onnx by {diff} (largest |logit| {scale})", task.name());
        worst = worst.max(diff / scale);
        // Rows picked out of a larger batch, in any order, give the same logits as those rows alone.
        let picked = [5usize, 0, 36, 5];
        let sub = head_logits_on_rows(&w.head, hidden.view(), &picked);
        for (i, &r) in picked.iter().enumerate() {
            assert_eq!(sub.row(i), host.row(r), "{}", task.name());
        }
        checked += 1;
    }
    assert!(checked >= 11, "only {checked} tasks with AdapterHub weights in the test repository");
    println!("host heads: {checked} tasks, max |host - head.onnx| / max(1, |logit|) = {worst:e}");
}
