//! A small test workload: answers every HTTP request and every UDP datagram with its own name, so a
//! client sees which backend served it. Used by the lab, the tests and the benchmark.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

/// Threads that accept and serve HTTP connections. A fixed pool, each thread serving the connection
/// it accepted, avoids a thread spawn per connection, which would dominate short-connection
/// benchmarks; it is large enough for the kept-alive connections the tests hold open at once.
const HTTP_WORKERS: usize = 32;

/// Serves HTTP/1.1 (keep-alive) on `listener` until the listener fails.
pub fn serve_http(listener: TcpListener, name: String) {
    let workers: Vec<_> = (0..HTTP_WORKERS)
        .filter_map(|_| {
            let listener = listener.try_clone().ok()?;
            let name = name.clone();
            Some(thread::spawn(move || {
                while let Ok((stream, _)) = listener.accept() {
                    let _ = http_connection(stream, &name);
                }
            }))
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

fn http_connection(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let body = format!("{name}\n");
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        if content_length > 0 {
            let mut sink = vec![0u8; content_length.min(1 << 20)];
            reader.read_exact(&mut sink)?;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
            body
        );
        writer.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

/// Answers each datagram with the server's name, until the socket fails.
pub fn serve_udp(socket: UdpSocket, name: String) {
    let mut buf = [0u8; 65_536];
    let reply = format!("{name}\n");
    loop {
        let Ok((_, peer)) = socket.recv_from(&mut buf) else {
            return;
        };
        let _ = socket.send_to(reply.as_bytes(), peer);
    }
}

/// Sends a byte stream back as it came: for bulk transfer checks.
pub fn serve_stream_echo(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Starts HTTP on TCP and the name echo on UDP, both on `addr`, in background threads.
pub fn spawn_all(addr: SocketAddr, name: &str) -> std::io::Result<()> {
    let tcp = TcpListener::bind(addr)?;
    let udp = UdpSocket::bind(addr)?;
    let n1 = name.to_string();
    let n2 = name.to_string();
    thread::spawn(move || serve_http(tcp, n1));
    thread::spawn(move || serve_udp(udp, n2));
    Ok(())
}
