//! TLS on the gRPC port with a certificate generated in the test: TLS clients that trust the CA
//! are served; plaintext clients and clients trusting another CA are not; bad TLS settings stop
//! start-up with a message naming the setting.

mod common;

use adapterdrop_serve::proto::inference_client::InferenceClient;
use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs};
use common::{TestServer, certs, ort_library, run_to_exit, test_repo};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn request() -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: "sent".into(), ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: vec!["secure and sound".into()] })),
        truncate: false,
        id: String::new(),
        return_fusion_weights: false,
        ..Default::default()
    }
}

async fn tls_channel(addr: &str, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    let port = addr.rsplit(':').next().unwrap();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    Channel::from_shared(format!("https://localhost:{port}")).unwrap().tls_config(tls)?.connect().await
}

#[tokio::test]
async fn tls_port_serves_trusting_clients_only() {
    let pki = certs::generate("test CA");
    let server = TestServer::start(&[
        ("ADAPTERDROP__TLS__CERT_PATH", pki.server_cert.to_str().unwrap()),
        ("ADAPTERDROP__TLS__KEY_PATH", pki.server_key.to_str().unwrap()),
    ]);
    let channel = tls_channel(&server.addr, &pki.ca_pem).await.expect("TLS handshake with the test CA");
    let resp = InferenceClient::new(channel).infer(request()).await.expect("infer over TLS");
    assert_eq!(resp.get_ref().results[0].sequences.len(), 1);

    // Plaintext HTTP/2 against the TLS port fails instead of being served in the clear.
    let mut plain = server.client().await;
    assert!(plain.infer(request()).await.is_err(), "plaintext request was served on the TLS port");

    // A client that trusts a different CA refuses the server's certificate.
    let other = certs::generate("another CA");
    let refused = match tls_channel(&server.addr, &other.ca_pem).await {
        Err(_) => true,
        Ok(ch) => InferenceClient::new(ch).infer(request()).await.is_err(),
    };
    assert!(refused, "a client trusting another CA was served");

    // The server keeps serving trusting clients after the failed handshakes.
    let channel = tls_channel(&server.addr, &pki.ca_pem).await.unwrap();
    InferenceClient::new(channel).infer(request()).await.expect("still serving");
}

#[test]
fn incomplete_or_unreadable_tls_settings_stop_start_up() {
    let pki = certs::generate("test CA");
    let repo = test_repo();
    let base = [
        ("ORT_DYLIB_PATH", ort_library().to_str().unwrap().to_string()),
        ("ADAPTERDROP__REPOSITORY__PATH", repo.to_str().unwrap().to_string()),
    ];
    let run = |extra: &[(&str, &str)]| {
        let mut env: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        run_to_exit(&env)
    };
    let (ok, out) = run(&[("ADAPTERDROP__TLS__CERT_PATH", pki.server_cert.to_str().unwrap())]);
    assert!(!ok && out.contains("tls.cert_path and tls.key_path must be set together"), "{out}");
    let (ok, out) =
        run(&[("ADAPTERDROP__TLS__CERT_PATH", "/nonexistent/cert.pem"), ("ADAPTERDROP__TLS__KEY_PATH", pki.server_key.to_str().unwrap())]);
    assert!(!ok && out.contains("cannot read TLS certificate /nonexistent/cert.pem"), "{out}");
    let (ok, out) = run(&[
        ("ADAPTERDROP__TLS__CERT_PATH", repo.join("expected.json").to_str().unwrap()),
        ("ADAPTERDROP__TLS__KEY_PATH", pki.server_key.to_str().unwrap()),
    ]);
    assert!(!ok && out.contains("holds no PEM block"), "{out}");
}

#[tokio::test]
async fn admin_port_requires_a_client_certificate_signed_by_the_client_ca() {
    use adapterdrop_serve::proto::ListTasksRequest;
    use adapterdrop_serve::proto::admin_client::AdminClient;
    use tonic::transport::Identity;

    let pki = certs::generate("test CA");
    let server = TestServer::start(&[
        ("ADAPTERDROP__TLS__CERT_PATH", pki.server_cert.to_str().unwrap()),
        ("ADAPTERDROP__TLS__KEY_PATH", pki.server_key.to_str().unwrap()),
        ("ADAPTERDROP__TLS__CLIENT_CA_PATH", pki.ca_path.to_str().unwrap()),
    ]);
    let admin = server.admin_addr();
    let port = admin.rsplit(':').next().unwrap().to_string();
    let connect = |identity: Option<Identity>| {
        let (ca, port) = (pki.ca_pem.clone(), port.clone());
        async move {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
            if let Some(id) = identity {
                tls = tls.identity(id);
            }
            let channel = Channel::from_shared(format!("https://localhost:{port}")).unwrap().tls_config(tls)?.connect().await?;
            Ok::<_, tonic::transport::Error>(AdminClient::new(channel))
        }
    };
    // With a client certificate from the trusted CA: served.
    let mut ok = connect(Some(Identity::from_pem(&pki.client_cert_pem, &pki.client_key_pem))).await.expect("mutual TLS handshake");
    let tasks = ok.list_tasks(ListTasksRequest {}).await.expect("admin over mutual TLS").into_inner().tasks;
    assert!(tasks.iter().any(|t| t.name == "sent"));
    // Without one, or with one from another CA: refused.
    let refused = match connect(None).await {
        Err(_) => true,
        Ok(mut c) => c.list_tasks(ListTasksRequest {}).await.is_err(),
    };
    assert!(refused, "admin served a client without a certificate");
    let other = certs::generate("another CA");
    let refused = match connect(Some(Identity::from_pem(&other.client_cert_pem, &other.client_key_pem))).await {
        Err(_) => true,
        Ok(mut c) => c.list_tasks(ListTasksRequest {}).await.is_err(),
    };
    assert!(refused, "admin served a client whose certificate another CA signed");
    // The inference port keeps server-only TLS: no client certificate needed there.
    let channel = tls_channel(&server.addr, &pki.ca_pem).await.unwrap();
    InferenceClient::new(channel).infer(request()).await.expect("inference without a client certificate");
}
