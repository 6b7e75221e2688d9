//! The UDP listener: hickory-server's request parsing, handler and response encoding, with the
//! socket driven here in batches — up to `BATCH` datagrams per `recvmmsg` and the answers that are
//! ready at once (cache hits and cluster names, which never wait) sent with one `sendmmsg`.
//! hickory's own UDP loop spawns a task and passes each answer through a channel per query, which
//! costs more than answering a cluster name does. A query that has to wait (forward) gets its own
//! task and is sent on its own when its answer comes.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd as _,
    sync::Arc,
};

use futures::FutureExt as _;
use tokio::{io::Interest, net::UdpSocket};
use tracing::{debug, warn};

use crate::server::{answer_udp, Handler};

/// Datagrams read (and answers sent) per system call.
pub const BATCH: usize = 32;
/// The largest query taken (EDNS0 buffers beyond this are not sent by clients of a cluster DNS).
const MAX_QUERY: usize = 4096;

/// Answers queries on `socket` until the task is aborted.
pub async fn serve(socket: UdpSocket, handler: Handler) {
    let socket = Arc::new(socket);
    let mut bufs = vec![[0u8; MAX_QUERY]; BATCH];
    loop {
        if let Err(e) = socket.readable().await {
            warn!(error = %e, "udp socket failed");
            return;
        }
        let received = socket.try_io(Interest::READABLE, || recv_batch(&socket, &mut bufs));
        let received = match received {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!(error = %e, "udp receive");
                continue;
            }
        };
        let mut answers: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(received.len());
        for (i, (len, src)) in received.into_iter().enumerate() {
            if src.port() == 0 {
                continue;
            }
            let mut pending = answer_udp(handler.clone(), bufs[i][..len].to_vec(), src).boxed();
            // Most answers need no waiting: take them now, batch them.
            match (&mut pending).now_or_never() {
                Some(answer) => answers.extend(answer.map(|a| (a, src))),
                None => {
                    // Waiting on an upstream: finish on its own task.
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        if let Some(answer) = pending.await {
                            if let Err(e) = socket.send_to(&answer, src).await {
                                debug!(error = %e, dst = %src, "udp send");
                            }
                        }
                    });
                }
            }
        }
        send_all(&socket, &answers).await;
    }
}

/// Sends the batch with `sendmmsg`, and whatever it could not take one by one.
async fn send_all(socket: &UdpSocket, answers: &[(Vec<u8>, SocketAddr)]) {
    let mut sent = 0;
    while sent < answers.len() {
        match socket.try_io(Interest::WRITABLE, || send_batch(socket, &answers[sent..])) {
            Ok(n) if n > 0 => sent += n,
            _ => {
                let (answer, dst) = &answers[sent];
                if let Err(e) = socket.send_to(answer, *dst).await {
                    debug!(error = %e, %dst, "udp send");
                }
                sent += 1;
            }
        }
    }
}

fn sockaddr_of(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn storage_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the matching variant is written below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// One `recvmmsg` without waiting: (length, source) of each datagram read into `bufs`.
fn recv_batch(
    socket: &UdpSocket,
    bufs: &mut [[u8; MAX_QUERY]],
) -> io::Result<Vec<(usize, SocketAddr)>> {
    let n = bufs.len();
    // SAFETY: all-zero sockaddr_storage and mmsghdr are valid initial values.
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; n];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs points at n initialised headers whose buffers and names outlive the call.
    let got = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(msgs
        .iter()
        .zip(&addrs)
        .take(got as usize)
        .filter(|(m, _)| m.msg_hdr.msg_flags & libc::MSG_TRUNC == 0)
        .filter_map(|(m, a)| Some((m.msg_len as usize, sockaddr_of(a)?)))
        .collect())
}

/// One `sendmmsg` without waiting: how many of `answers` the kernel took.
fn send_batch(socket: &UdpSocket, answers: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let n = answers.len().min(BATCH);
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        answers[..n].iter().map(|(_, a)| storage_of(a)).collect();
    let mut iovs: Vec<libc::iovec> = answers[..n]
        .iter()
        .map(|(b, _)| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            // SAFETY: an all-zero mmsghdr is a valid initial value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = addrs[i].1;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs points at n initialised headers whose buffers and names outlive the call.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as u32,
            libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}
