//! The pingora adapter: reads one request, calls [`Simulator::handle`], writes the response
//! with `Content-Length` (pingora close-delimits bodies without it, see docs/design.md, "pingora facts" 4).

use crate::{SimResponse, Simulator};
use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

/// Bodies above this are refused with 413 (insight bodies are a few KB).
const MAX_BODY: usize = 10 * 1024 * 1024;

/// A pingora [`ServeHttp`] app serving a [`Simulator`]; see [`Simulator::service`].
pub struct SimApp {
    sim: Simulator,
}

impl SimApp {
    pub fn new(sim: Simulator) -> Self {
        Self { sim }
    }
}

#[async_trait]
impl ServeHttp for SimApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let header = session.req_header();
        let method = header.method.as_str().to_owned();
        let target = header.uri.path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
        let headers = header.headers.clone();

        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_BODY => body.extend_from_slice(&chunk),
                Ok(Some(_)) => {
                    // The rest of the body is unread, so the connection cannot be reused.
                    session.set_keepalive(None);
                    return to_http(crate::error::ApiError::payload_too_large(MAX_BODY).into());
                }
                Ok(None) => break,
                Err(_) => {
                    session.set_keepalive(None);
                    return to_http(crate::error::ApiError::bad_request("Could not read the request body.").into());
                }
            }
        }
        to_http(self.sim.handle(&method, &target, &headers, &body).await)
    }
}

fn to_http(r: SimResponse) -> Response<Vec<u8>> {
    let mut resp = Response::new(r.body.to_vec());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    for (name, value) in r.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            headers.append(name, value);
        }
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from(r.body.len()));
    resp
}
