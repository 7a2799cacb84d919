//! Issue 14, backbones: XLM-RoBERTa, DistilBERT and ELECTRA (and BERT/RoBERTa from the same script)
//! served exactly like the AdapterHub `adapters` library computes them, at every drop depth, for
//! Pfeiffer and Houlsby sequence-classification tasks, from ids, texts and text pairs (the server's
//! tokenizer must give the library's ids). Expected values: the library's own outputs committed in
//! `tests/fixtures/adapterhub-breadth/<backbone>/reference.json` (tools/train/make_breadth_fixtures.py);
//! the repository is their export by `make breadth-repo` (tools/make_breadth_repo.py).

mod admin_support;
mod common;

use adapterdrop_serve::proto::{GetTaskRequest, TaskStatus, TextPair, TextPairs, Texts, TokenizedInputs, infer_request::Inputs};
use common::breadth::{BACKBONES, assert_close, breadth_repo, reference, strings, unpadded};
use common::{TestServer, copy_dir, infer_logits};

/// Served task suffix -> fixture task name.
const TASKS: [(&str, &str); 3] = [("pfeiffer", "pfeiffer"), ("houlsby", "houlsby"), ("pairs", "pfeiffer_pairs")];

#[tokio::test]
async fn new_backbones_match_the_library_at_every_drop_depth() {
    let server = TestServer::start_on(&breadth_repo(), &[]);
    let mut worst = 0.0f64;
    for backbone in BACKBONES {
        let fx = reference(backbone);
        let layers = fx["num_layers"].as_u64().unwrap() as u32;
        let texts = strings(&fx["texts"]);
        let pairs: Vec<TextPair> = fx["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| TextPair { text: p[0].as_str().unwrap().into(), text_pair: p[1].as_str().unwrap().into() })
            .collect();
        for (suffix, fixture) in TASKS {
            let task = format!("{backbone}-{suffix}");
            let spec = &fx["tasks"][fixture];
            let which = spec["inputs"].as_str().unwrap();
            let ids = unpadded(&fx["inputs"][which]);
            for n in 0..=layers {
                let want = &spec["outputs"][n.to_string()]["logits"];
                let got = infer_logits(&server, &task, n, Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })).await;
                worst = worst.max(assert_close(&format!("{task} ids n={n}"), &got, want));
                // Server-side tokenization (the exported tokenizer.json) must give the library's ids.
                let raw = if which == "pairs" {
                    Inputs::Pairs(TextPairs { pairs: pairs.clone() })
                } else {
                    Inputs::Texts(Texts { texts: texts.clone() })
                };
                let got = infer_logits(&server, &task, n, raw).await;
                worst = worst.max(assert_close(&format!("{task} {which} n={n}"), &got, want));
            }
        }
    }
    eprintln!("breadth exactness: worst max abs diff {worst:e} over 5 backbones x 3 tasks x every drop depth");
}

/// Runs the server on `repo` until it listens; returns everything it logged until then.
fn start_up_logs(repo: &std::path::Path) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = common::server_command(repo).spawn().expect("spawn server");
    let (tx, rx) = std::sync::mpsc::channel();
    for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
        let tx = tx.clone();
        std::thread::spawn(move || BufReader::new(stream).lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    }
    drop(tx);
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        let done = line.contains("listening addr=");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen.join("\n")
}

/// A backbone whose manifest names an architecture the server does not know is refused at start-up
/// with a message naming it and the supported ones; its tasks are FAILED, the others keep serving.
#[tokio::test]
async fn unknown_architecture_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    let src = breadth_repo();
    for b in ["bert", "electra"] {
        copy_dir(&src.join("backbones").join(b), &repo.join("backbones").join(b));
        copy_dir(&src.join("tasks").join(format!("{b}-pfeiffer")), &repo.join("tasks").join(format!("{b}-pfeiffer")));
    }
    let manifest = repo.join("backbones/electra/backbone.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("\"architecture\": \"electra\""));
    std::fs::write(&manifest, text.replace("\"architecture\": \"electra\"", "\"architecture\": \"gpt2\"")).unwrap();

    let logs = start_up_logs(repo);
    assert!(logs.contains("backbone refused") && logs.contains("unknown variant `gpt2`") && logs.contains("`xlm-roberta`"), "{logs}");

    let server = TestServer::start_on(repo, &[]);
    let mut c = server.client().await;
    let bert = c.get_task(GetTaskRequest { name: "bert-pfeiffer".into(), version: None }).await.unwrap().into_inner();
    assert_eq!(bert.status, TaskStatus::Ready as i32);
    let electra = c.get_task(GetTaskRequest { name: "electra-pfeiffer".into(), version: None }).await.unwrap().into_inner();
    assert_eq!(electra.status, TaskStatus::Failed as i32, "{}", electra.status_reason);
    assert!(electra.status_reason.contains("backbone `electra` is not loaded"), "{}", electra.status_reason);
}

/// Tasks on the new backbones register at run time through the admin API like any task, and the
/// registered version serves the library's numbers at every drop depth.
#[tokio::test]
async fn new_backbone_tasks_register_at_run_time() {
    use admin_support::{admin, header, register};
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    let src = breadth_repo();
    let new = ["xlm-roberta", "distilbert", "electra"];
    for b in new {
        copy_dir(&src.join("backbones").join(b), &repo.join("backbones").join(b));
    }
    std::fs::create_dir_all(repo.join("tasks")).unwrap();
    let server = TestServer::start_on(repo, &[]);
    let mut a = admin(&server.admin_addr()).await;
    for b in new {
        let name = format!("{b}-registered");
        let resp = register(&mut a, header(&name, None, true, false), &src.join("tasks").join(format!("{b}-houlsby")).join("1"))
            .await
            .unwrap_or_else(|s| panic!("register {name}: {s}"));
        let info = resp.task.unwrap();
        assert_eq!((info.status, info.backbone.as_str()), (TaskStatus::Ready as i32, b), "{}", info.status_reason);
        let fx = reference(b);
        let ids = unpadded(&fx["inputs"]["texts"]);
        for n in 0..=fx["num_layers"].as_u64().unwrap() as u32 {
            let got = infer_logits(&server, &name, n, Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })).await;
            assert_close(&format!("{name} n={n}"), &got, &fx["tasks"]["houlsby"]["outputs"][n.to_string()]["logits"]);
        }
    }
}
