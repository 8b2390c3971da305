//! `emberd query` and `emberd status`: a small client for the daemon's socket
//! (hyper's HTTP/1 client over a Unix stream).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixStream;

/// Send one request to the daemon.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Response<Incoming>> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot connect to {} (is emberd serve running? --socket sets the path)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the daemon")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    Ok(sender.send_request(req).await?)
}

/// The whole body of a response as JSON.
pub async fn json_body(resp: Response<Incoming>) -> anyhow::Result<(StatusCode, Value)> {
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Ok((status, v))
}

fn error_text(v: &Value) -> String {
    v.pointer("/error/message")
        .and_then(|m| m.as_str())
        .map(String::from)
        .unwrap_or_else(|| v.to_string())
}

/// What `emberd query` asks for.
#[derive(Debug, Clone)]
pub struct Query {
    /// Model name (the daemon's first model when absent).
    pub model: Option<String>,
    /// Use the chat endpoint.
    pub chat: bool,
    /// The prompt (the user message with `chat`).
    pub prompt: String,
    /// Most tokens.
    pub max_tokens: usize,
    /// Temperature, if set.
    pub temperature: Option<f32>,
    /// Seed, if set.
    pub seed: Option<u64>,
}

/// Stream a completion to `out`; returns the finish reason.
pub async fn query(socket: &Path, q: &Query, out: &mut impl Write) -> anyhow::Result<String> {
    let mut body = if q.chat {
        json!({"messages": [{"role": "user", "content": q.prompt}]})
    } else {
        json!({"prompt": q.prompt})
    };
    body["stream"] = json!(true);
    body["max_tokens"] = json!(q.max_tokens);
    if let Some(m) = &q.model {
        body["model"] = json!(m);
    }
    if let Some(t) = q.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(s) = q.seed {
        body["seed"] = json!(s);
    }
    let path = if q.chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let resp = request(socket, Method::POST, path, Some(&body)).await?;
    if !resp.status().is_success() {
        let (status, v) = json_body(resp).await?;
        bail!("daemon refused the request ({status}): {}", error_text(&v));
    }
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut finish = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the stream")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(d) = line.strip_prefix("data:") else {
                    continue;
                };
                let d = d.trim_start();
                if d == "[DONE]" {
                    return Ok(finish);
                }
                let v: Value =
                    serde_json::from_str(d).context("the daemon sent a malformed chunk")?;
                if v.get("error").is_some() {
                    bail!("generation failed: {}", error_text(&v));
                }
                let c = &v["choices"][0];
                let text = c["text"]
                    .as_str()
                    .or_else(|| c["delta"]["content"].as_str())
                    .unwrap_or("");
                out.write_all(text.as_bytes())?;
                out.flush()?;
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
    }
    bail!("the stream ended before [DONE]")
}

/// `emberd status`: health, models and the main counters, as a table.
pub async fn status(socket: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let (code, health) = json_body(request(socket, Method::GET, "/health", None).await?).await?;
    let (_, models) = json_body(request(socket, Method::GET, "/v1/models", None).await?).await?;
    let metrics_resp = request(socket, Method::GET, "/metrics", None).await?;
    let metrics =
        String::from_utf8_lossy(&metrics_resp.into_body().collect().await?.to_bytes()).into_owned();
    writeln!(
        out,
        "emberd {} at {}: {} ({})",
        health["version"].as_str().unwrap_or("?"),
        socket.display(),
        health["status"].as_str().unwrap_or("?"),
        code
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<16} {:<8} {:<8} {:>7} {:>6} {:>6} {:>9} {:>10} {:>9}",
        "MODEL", "STATE", "FAMILY", "CONTEXT", "BATCH", "QUEUE", "REQUESTS", "TOKENS", "LOAD ms"
    )?;
    let empty = vec![];
    for m in models["data"].as_array().unwrap_or(&empty) {
        let name = m["id"].as_str().unwrap_or("?");
        let h = &health["models"][name];
        let metric = |prefix: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix) && l.contains(&format!("model=\"{name}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        writeln!(
            out,
            "{:<16} {:<8} {:<8} {:>7} {:>6} {:>6} {:>9} {:>10} {:>9.0}",
            name,
            h["state"].as_str().unwrap_or("?"),
            m["family"].as_str().unwrap_or("?"),
            m["context_length"]
                .as_u64()
                .map_or("-".into(), |c| c.to_string()),
            format!("{}/{}", h["active"], m["max_batch"]),
            h["queued"].as_u64().unwrap_or(0),
            metric("ember_requests_total{") as u64,
            metric("ember_generated_tokens_total{") as u64,
            h["load_ms"].as_f64().unwrap_or(0.0),
        )?;
    }
    Ok(code.is_success())
}
