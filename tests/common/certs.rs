//! Certificates generated per test run: a CA, a server certificate for `localhost` and
//! 127.0.0.1, and a client certificate, all as PEM files in a temporary directory.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ca_path: PathBuf,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A fresh PKI; `ca_name` distinguishes unrelated CAs in negative tests.
pub fn generate(ca_name: &str) -> TestPki {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(ca_name);
    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "adapterdrop-serve test");
    let server = sp.signed_by(&server_key, &ca).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(vec!["client".to_string()]).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "test client");
    let client = cp.signed_by(&client_key, &ca).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    TestPki {
        server_cert: write("server.pem", &server.pem()),
        server_key: write("server.key", &server_key.serialize_pem()),
        ca_path: write("ca.pem", &ca.pem()),
        ca_pem: ca.pem(),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
        dir,
    }
}
