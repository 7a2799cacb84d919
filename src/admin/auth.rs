//! Bearer-token check for a gRPC service: `authorization: Bearer <token>` must carry the configured
//! token; an empty configured token lets every request through.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::ServeError;

#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
    /// Which service and config key, for the error message: e.g. ("admin", "auth.admin_token").
    scope: &'static str,
    key: &'static str,
}

impl BearerAuth {
    pub fn new(token: &str, scope: &'static str, key: &'static str) -> Self {
        let token = (!token.is_empty()).then(|| Arc::from(token.as_bytes()));
        Self { token, scope, key }
    }

    pub fn required(&self) -> bool {
        self.token.is_some()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else { return Ok(request) };
        let Some(value) = request.metadata().get("authorization") else {
            return Err(unauthenticated(format!(
                "missing `authorization: Bearer <token>` metadata: the {} service requires the token configured as {}",
                self.scope, self.key
            )));
        };
        let presented = value.to_str().ok().and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().as_bytes().to_vec())
        });
        match presented {
            Some(t) if constant_time_eq(&t, expected) => Ok(request),
            Some(_) => Err(unauthenticated(format!("invalid bearer token for the {} service ({})", self.scope, self.key))),
            None => {
                Err(unauthenticated(format!("malformed authorization metadata: expected `Bearer <token>` for the {} service", self.scope)))
            }
        }
    }
}

fn unauthenticated(message: String) -> Status {
    ServeError::Unauthenticated(message).into()
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), Status> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        auth.call(req).map(|_| ())
    }

    #[test]
    fn tokens_are_checked_only_when_configured() {
        let mut open = BearerAuth::new("", "admin", "auth.admin_token");
        assert!(call(&mut open, None).is_ok());
        let mut auth = BearerAuth::new("s3cret", "admin", "auth.admin_token");
        assert!(call(&mut auth, Some("Bearer s3cret")).is_ok());
        assert!(call(&mut auth, Some("bearer s3cret")).is_ok());
        for bad in [None, Some("Bearer nope"), Some("s3cret"), Some("Basic s3cret"), Some("Bearer s3cre")] {
            let e = call(&mut auth, bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }
}
