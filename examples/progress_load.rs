//! Load client for the benchmark (bench/bench.py): `GET /api/v1.0/progress` at a fixed rate
//! on one keep-alive connection, until the stage is `success` or `failed` (or a time limit),
//! then prints latency percentiles of the requests answered while the stage was
//! `installing`, as JSON. Usage: `progress_load` HOST:PORT `RATE_PER_S` `MAX_SECONDS`

// A benchmark tool's one loop, read top to bottom; the percentile index is of a non-empty list.
#![allow(clippy::too_many_lines, clippy::cast_sign_loss)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).expect("HOST:PORT");
    let rate: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000.0);
    let limit = Duration::from_secs_f64(args.get(3).and_then(|s| s.parse().ok()).unwrap_or(60.0));
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).ok();
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let request = format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (start, mut next) = (Instant::now(), Instant::now());
    let (mut installing, mut all) = (Vec::new(), 0usize);
    let mut stages = std::collections::BTreeMap::<String, usize>::new();
    loop {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        let t = Instant::now();
        writer.write_all(request.as_bytes()).expect("write");
        // Status line and headers, then Content-Length bytes.
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).expect("body");
        let us = t.elapsed().as_secs_f64() * 1e6;
        all += 1;
        let text = String::from_utf8_lossy(&body);
        let stage =
            ["installing", "success", "failed", "downloading", "verifying", "toInstall", "idle"]
                .into_iter()
                .find(|s| text.contains(&format!("\"{s}\"")))
                .unwrap_or("other");
        *stages.entry(stage.to_string()).or_default() += 1;
        if stage == "installing" {
            installing.push(us);
        }
        if (stage == "success" || stage == "failed") && !installing.is_empty()
            || start.elapsed() > limit
        {
            break;
        }
    }
    installing.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        installing
            .get(((installing.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"requests\": {all}, \"rate\": {:.0}, \"installing\": {}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"max_us\": {:.1}, \"stages\": {:?}}}",
        all as f64 / secs,
        installing.len(),
        pct(0.5),
        pct(0.99),
        installing.last().copied().unwrap_or(f64::NAN),
        stages
    );
}
