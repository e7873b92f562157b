//! The endpoint: `GET /metrics` answered with the latest text, over
//! hyper's HTTP/1, one request per connection, within bounds a client
//! cannot push past (connections held, time, request size).

use std::{collections::VecDeque, convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{CONTENT_TYPE, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::AbortHandle};

use super::Shared;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once. A new one beyond this closes the oldest:
/// the one most likely idle (an answered connection closes at once), so a
/// fresh scrape is served however many idle connections are held open.
const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request and read the answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// The largest request head read (a scrape's request line and headers);
/// a larger one is answered 431.
const MAX_REQUEST: usize = 4096;
/// Pause after a failed accept (such as running out of file descriptors)
/// instead of retrying at once, which would spin on a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Answers `GET /metrics` with the latest text until the run ends.
pub async fn serve(listener: TcpListener, text: Shared) {
    let mut live: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        live.retain(|connection| !connection.is_finished());
        if live.len() >= MAX_CONNECTIONS
            && let Some(oldest) = live.pop_front()
        {
            oldest.abort();
        }
        let connection = tokio::spawn(serve_connection(stream, text.clone()));
        live.push_back(connection.abort_handle());
    }
}

/// One request and its answer, then the connection closes.
async fn serve_connection(stream: tokio::net::TcpStream, text: Shared) {
    let service = hyper::service::service_fn(move |request| {
        std::future::ready(Ok::<_, Infallible>(answer(&request, &text)))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_header_size(MAX_REQUEST)
        // CONNECTION_DEADLINE bounds the whole exchange, the request's
        // head included.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    // A connection past its deadline is simply dropped (closed).
    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
        log::debug!("metrics: connection failed: {e}");
    }
}

fn answer<B>(request: &Request<B>, text: &Shared) -> Response<Full<Bytes>> {
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return response(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    let mut body = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if body.is_empty() {
        // Not refreshed yet: an empty exposition.
        body = Bytes::from_static(b"# EOF\n");
    }
    response(StatusCode::OK, OPENMETRICS, body)
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        time::Instant,
    };

    use super::*;

    /// Serves `text` on a loopback port from a thread of its own.
    fn endpoint(text: &'static str) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let listener = TcpListener::from_std(listener).unwrap();
                serve(
                    listener,
                    Shared::new(Bytes::from_static(text.as_bytes()).into()),
                )
                .await;
            });
        });
        address
    }

    /// Sends `request`, reads until the server closes: the whole response.
    fn exchange(address: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    fn status_and_body(response: &str) -> (&str, &str) {
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap(), body)
    }

    #[test]
    fn a_scrape_gets_the_text_and_the_connection_closes() {
        let address = endpoint("x 1\n# EOF\n");
        let response = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            status_and_body(&response),
            ("HTTP/1.1 200 OK", "x 1\n# EOF\n")
        );
        assert!(
            response.contains(&format!("content-type: {OPENMETRICS}\r\n")),
            "{response}"
        );
        assert!(response.contains("content-length: 10\r\n"), "{response}");
    }

    #[test]
    fn before_the_first_refresh_the_exposition_is_empty() {
        let address = endpoint("");
        let response = exchange(address, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(status_and_body(&response), ("HTTP/1.0 200 OK", "# EOF\n"));
    }

    #[test]
    fn only_get_metrics_is_served() {
        let address = endpoint("x 1\n# EOF\n");
        for request in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ] {
            let response = exchange(address, request);
            assert_eq!(
                status_and_body(&response),
                ("HTTP/1.1 404 Not Found", "see /metrics\n")
            );
        }
    }

    #[test]
    fn a_request_over_4_kib_is_refused() {
        let address = endpoint("x 1\n# EOF\n");
        let padding = "a".repeat(MAX_REQUEST);
        let request = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {padding}\r\n\r\n");
        let response = exchange(address, request.as_bytes());
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
    }

    #[test]
    fn beyond_64_connections_the_oldest_is_closed() {
        let address = endpoint("x 1\n# EOF\n");
        let mut idle: Vec<TcpStream> = (0..=MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(address).unwrap())
            .collect();
        let started = Instant::now();
        let mut oldest = idle.remove(0);
        oldest
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(oldest.read(&mut [0; 1]).unwrap(), 0);
        assert!(started.elapsed() < Duration::from_secs(1));
        // The second oldest is still open: its read times out.
        idle[0]
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let error = idle[0].read(&mut [0; 1]).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn an_idle_connection_is_closed_after_5_s() {
        let address = endpoint("x 1\n# EOF\n");
        let mut idle = TcpStream::connect(address).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(7))).unwrap();
        let started = Instant::now();
        assert_eq!(idle.read(&mut [0; 1]).unwrap(), 0);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(4900) && waited < Duration::from_secs(6),
            "closed after {waited:?}"
        );
    }
}
