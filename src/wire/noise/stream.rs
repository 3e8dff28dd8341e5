//! Async shell over the [`super`] record layer: a tokio byte stream that HTTP/2 runs on.
//!
//! Mirrors tailscale `control/controlbase/conn.go` (`Conn.Read`/`Conn.Write`) and the early
//! payload handling of `control/controlclient/noise.go` / `internal/noiseconn/conn.go`.
//!
//! The handshake itself happens elsewhere (inside the HTTP/1.1 upgrade): the caller builds the
//! initiation with [`super::initiate`], reads the reply with [`read_response_message`], finishes
//! with [`super::Initiator::finish`] and then wraps the socket in [`NoiseStream::new`], passing
//! any bytes its HTTP reader already pulled past the response. Writes are sealed into a queue and
//! only reach the socket on the next write or on `flush`, as with `tokio::io::BufWriter`, so
//! callers must flush (h2 does).
#![forbid(unsafe_code)]

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::{
    parse_early_payload_header, NoiseError, RecordReader, Transport, EARLY_PAYLOAD_HEADER_LEN, HEADER_LEN,
    MAX_EARLY_PAYLOAD_LEN, MAX_FRAME_SIZE, MAX_PLAINTEXT_SIZE, MSG_TYPE_ERROR, MSG_TYPE_RESPONSE, RESPONSE_PAYLOAD_LEN,
};

/// Bytes asked of the socket per read: one maximal record, so a read never buffers much more
/// than the frame currently being reassembled.
const READ_CHUNK: usize = MAX_FRAME_SIZE;
/// Plaintext sealed per `poll_write` call (four full records), bounding each call's work.
const WRITE_CHUNK: usize = 4 * MAX_PLAINTEXT_SIZE;
/// Sealed-but-unsent bytes above which `poll_write` waits for the socket instead of queueing
/// more; this is the stream's only backpressure point.
const WRITE_HIGH_WATER: usize = 16 * MAX_FRAME_SIZE;
/// Capacity an emptied buffer may keep. A burst (a full map of a large tailnet) grows the write
/// queue to [`WRITE_HIGH_WATER`]; kept, that room would sit idle on every connection of a
/// coordinator with thousands of them, so an emptied buffer larger than this is freed and the
/// next small write allocates afresh.
const IDLE_BUFFER_MAX: usize = 1024;

/// Empties `buf`, freeing its room if it grew past [`IDLE_BUFFER_MAX`].
fn release(buf: &mut Vec<u8>) {
    if buf.capacity() > IDLE_BUFFER_MAX {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
}

fn noise_io_error(e: NoiseError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A Noise transport over `IO`, itself usable as `AsyncRead + AsyncWrite` (e.g. by `h2`).
///
/// Any decryption failure, malformed record or write error is sticky: later calls keep failing,
/// because the two sides' counters can no longer be trusted to agree.
#[derive(Debug)]
pub struct NoiseStream<IO> {
    io: IO,
    transport: Transport,
    reader: RecordReader,
    /// Decrypted plaintext not yet handed out; `plain_pos` is the first unread byte.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Sealed records not yet written; `wpos` is the first unwritten byte.
    wbuf: Vec<u8>,
    wpos: usize,
    read_eof: bool,
    read_err: Option<NoiseError>,
    write_failed: bool,
}

impl<IO> NoiseStream<IO> {
    /// Wraps `io` after a finished handshake. `leftover` holds bytes already read from `io`
    /// past the handshake response; they are treated as the start of the record stream.
    pub fn new(io: IO, transport: Transport, leftover: Vec<u8>) -> Self {
        let mut reader = RecordReader::new();
        reader.push(&leftover);
        Self {
            io,
            transport,
            reader,
            plain: Vec::new(),
            plain_pos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            read_eof: false,
            read_err: None,
            write_failed: false,
        }
    }

    /// The Noise handshake hash of this connection (for channel binding).
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.transport.handshake_hash()
    }

    /// The underlying connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The underlying connection, mutably. Reading or writing it directly desynchronises the
    /// stream.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    fn buffered_plain(&self) -> usize {
        self.plain.len() - self.plain_pos
    }

    fn consume_plain(&mut self, n: usize) {
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            release(&mut self.plain);
            self.plain_pos = 0;
        }
    }
}

impl<IO: AsyncRead + Unpin> NoiseStream<IO> {
    /// Decrypts records until at least `want` plaintext bytes are buffered or the peer closed
    /// cleanly (then fewer may be buffered). Errors are remembered and repeated.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<()>> {
        loop {
            if self.buffered_plain() >= want {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = self.read_err {
                return Poll::Ready(Err(noise_io_error(e)));
            }
            match self.transport.open(&mut self.reader) {
                Ok(Some(p)) => {
                    if self.plain_pos > 0 {
                        self.plain.drain(..self.plain_pos);
                        self.plain_pos = 0;
                    }
                    self.plain.extend_from_slice(&p);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    self.read_err = Some(e);
                    return Poll::Ready(Err(noise_io_error(e)));
                }
            }
            if self.read_eof {
                if self.reader.buffered() > 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "noise peer closed in the middle of a record",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut scratch);
            let Poll::Ready(res) = Pin::new(&mut self.io).poll_read(cx, &mut rb) else {
                // Nothing more to read for now: an idle connection keeps no read buffer.
                self.reader.release_if_empty(IDLE_BUFFER_MAX);
                return Poll::Pending;
            };
            match res {
                Ok(()) => {}
                // A TLS peer gone without close_notify: an end like any other here, since the
                // Noise framing still tells a clean end from a cut record.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if rb.filled().is_empty() {
                self.read_eof = true;
            } else {
                self.reader.push(rb.filled());
            }
        }
    }

    /// Client side of spec §2.5: peeks the first 9 plaintext bytes. If they carry the early
    /// payload magic, reads and removes the JSON (at most [`MAX_EARLY_PAYLOAD_LEN`]) and
    /// returns it; otherwise leaves them buffered for HTTP/2 and returns `None`.
    ///
    /// This waits for the server to send something first. Go control servers and headscale do
    /// (early payload or HTTP/2 SETTINGS); a server that waits for the client preface would
    /// deadlock, so only call it against such servers or under a timeout.
    pub async fn strip_early_payload(&mut self) -> io::Result<Option<Vec<u8>>> {
        poll_fn(|cx| self.poll_fill(cx, EARLY_PAYLOAD_HEADER_LEN)).await?;
        let Some(len) = parse_early_payload_header(&self.plain[self.plain_pos..]) else {
            return Ok(None);
        };
        if len > MAX_EARLY_PAYLOAD_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "noise early payload too large",
            ));
        }
        let total = EARLY_PAYLOAD_HEADER_LEN + len;
        poll_fn(|cx| self.poll_fill(cx, total)).await?;
        if self.buffered_plain() < total {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "noise early payload truncated",
            ));
        }
        let start = self.plain_pos + EARLY_PAYLOAD_HEADER_LEN;
        let json = self.plain[start..self.plain_pos + total].to_vec();
        self.consume_plain(total);
        Ok(Some(json))
    }
}

impl<IO: AsyncWrite + Unpin> NoiseStream<IO> {
    /// Writes queued records until none remain.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let res = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]));
            match res {
                Ok(0) => {
                    self.write_failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => self.wpos += n,
                Err(e) => {
                    // A record may be half on the wire: the peer's counter is now unknowable.
                    self.write_failed = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        release(&mut self.wbuf);
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.write_failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "noise stream failed on an earlier write",
            ));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for NoiseStream<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_fill(cx, 1))?;
        // Nothing buffered after poll_fill means a clean EOF: return without filling.
        let n = this.buffered_plain().min(buf.remaining());
        buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
        this.consume_plain(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for NoiseStream<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_writable()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.wpos < this.wbuf.len() {
            match this.poll_drain(cx) {
                Poll::Ready(r) => r?,
                // Keep accepting while the queue is short; the socket's waker is registered.
                Poll::Pending if this.wbuf.len() - this.wpos >= WRITE_HIGH_WATER => return Poll::Pending,
                Poll::Pending => {
                    this.wbuf.drain(..this.wpos);
                    this.wpos = 0;
                }
            }
        }
        let n = buf.len().min(WRITE_CHUNK);
        this.transport.seal(&buf[..n], &mut this.wbuf).map_err(noise_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_writable()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_writable()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Reads the server's handshake reply (0x02 response or 0x03 error: header and body) from
/// `leftover` first, then `io`. Returns exactly that message; any bytes read past it stay in
/// `leftover` for [`NoiseStream::new`]. A wrong type or a 0x02 length other than 48 is
/// `InvalidData`; EOF before the end is `UnexpectedEof`.
pub async fn read_response_message<IO: AsyncRead + Unpin>(io: &mut IO, leftover: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    fill_to(io, leftover, HEADER_LEN).await?;
    let len = usize::from(u16::from_be_bytes([leftover[1], leftover[2]]));
    match leftover[0] {
        MSG_TYPE_RESPONSE if len != RESPONSE_PAYLOAD_LEN => return Err(noise_io_error(NoiseError::WrongLength)),
        MSG_TYPE_RESPONSE | MSG_TYPE_ERROR => {}
        t => return Err(noise_io_error(NoiseError::UnexpectedType(t))),
    }
    let total = HEADER_LEN + len;
    fill_to(io, leftover, total).await?;
    Ok(leftover.drain(..total).collect())
}

/// Reads from `io` into `buf` until it holds at least `n` bytes (possibly more).
async fn fill_to<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    while buf.len() < n {
        buf.reserve(n - buf.len());
        if io.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF in noise handshake response",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::{
        wire::keys::MachinePrivate,
        wire::noise::{early_payload, error_message, initiate, respond, RESPONSE_LEN},
    };

    /// Handshakes with fixed keys and returns (client transport, server transport).
    fn transports() -> (Transport, Transport) {
        let machine = MachinePrivate::from_random([1; 32]);
        let server = MachinePrivate::from_random([2; 32]);
        let (init, msg) = initiate(&machine, &server.public(), 130, [3; 32]);
        let acc = respond(&server, &msg, [4; 32]).unwrap();
        (init.finish(&acc.response).unwrap(), acc.transport)
    }

    /// A connected pair over a small in-memory pipe, so writes hit backpressure.
    fn stream_pair(pipe: usize) -> (NoiseStream<DuplexStream>, NoiseStream<DuplexStream>) {
        let (c, s) = duplex(pipe);
        let (ct, st) = transports();
        (NoiseStream::new(c, ct, Vec::new()), NoiseStream::new(s, st, Vec::new()))
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn sizes_around_record_boundaries_both_directions() {
        for size in [1usize, 4076, 4077, 4078, 8154, 8155, 70_000] {
            let (mut c, mut s) = stream_pair(1000);
            let data = pattern(size);
            let back: Vec<u8> = data.iter().rev().copied().collect();
            let client = async {
                c.write_all(&data).await.unwrap();
                c.flush().await.unwrap();
                let mut got = vec![0; size];
                c.read_exact(&mut got).await.unwrap();
                c.shutdown().await.unwrap();
                got
            };
            let server = async {
                let mut got = vec![0; size];
                s.read_exact(&mut got).await.unwrap();
                s.write_all(&back).await.unwrap();
                s.flush().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                got
            };
            let (c_got, s_got) = tokio::join!(client, server);
            assert_eq!(s_got, data, "client->server size {size}");
            assert_eq!(c_got, back, "server->client size {size}");
        }
    }

    /// Idle connections keep no burst-sized buffers: after a large transfer in each direction
    /// both sides hold at most [`IDLE_BUFFER_MAX`] bytes of buffer room once idle.
    #[tokio::test]
    async fn buffers_shrink_once_drained() {
        let (mut c, mut s) = stream_pair(1000);
        let data = pattern(200_000);
        let (_, got) = tokio::join!(
            async {
                c.write_all(&data).await.unwrap();
                c.flush().await.unwrap();
            },
            async {
                let mut got = vec![0; data.len()];
                s.read_exact(&mut got).await.unwrap();
                got
            }
        );
        assert_eq!(got, data);
        assert!(
            c.wbuf.capacity() <= IDLE_BUFFER_MAX,
            "writer kept {}",
            c.wbuf.capacity()
        );
        assert!(
            s.plain.capacity() <= IDLE_BUFFER_MAX,
            "reader kept {}",
            s.plain.capacity()
        );
        // The record buffer goes once the reader finds the socket empty.
        let mut one = [0u8; 1];
        tokio::select! {
            biased;
            _ = s.read(&mut one) => panic!("nothing was sent"),
            _ = std::future::ready(()) => {}
        }
        assert!(
            s.reader.buf.capacity() <= IDLE_BUFFER_MAX,
            "records kept {}",
            s.reader.buf.capacity()
        );
        // Still usable afterwards.
        c.write_all(b"ping").await.unwrap();
        c.flush().await.unwrap();
        let mut four = [0; 4];
        s.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"ping");
    }

    #[tokio::test]
    async fn leftover_bytes_are_the_start_of_the_stream() {
        let (ct, mut st) = transports();
        let mut wire = Vec::new();
        st.seal(&pattern(10_000), &mut wire).unwrap();
        // The upgrade reader swallowed part of the first record and beyond.
        let (head, tail) = wire.split_at(5000);
        let (c, mut s) = duplex(64 * 1024);
        let mut cs = NoiseStream::new(c, ct, head.to_vec());
        s.write_all(tail).await.unwrap();
        drop(s);
        let mut got = Vec::new();
        cs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, pattern(10_000));
    }

    #[tokio::test]
    async fn read_response_message_splits_leftover() {
        let machine = MachinePrivate::from_random([1; 32]);
        let server = MachinePrivate::from_random([2; 32]);
        let (init, msg) = initiate(&machine, &server.public(), 130, [3; 32]);
        let mut acc = respond(&server, &msg, [4; 32]).unwrap();
        let mut after = Vec::new();
        acc.transport.seal(b"hi", &mut after).unwrap();

        let (mut c, mut s) = duplex(4096);
        let mut leftover = acc.response[..10].to_vec();
        let mut rest = acc.response[10..].to_vec();
        rest.extend_from_slice(&after);
        s.write_all(&rest).await.unwrap();
        let resp = read_response_message(&mut c, &mut leftover).await.unwrap();
        assert_eq!(resp.len(), RESPONSE_LEN);
        let transport = init.finish(&resp).unwrap();
        // Whatever came along with the response is still there for the stream (it may also
        // still be in the pipe, depending on how much the read pulled).
        let mut cs = NoiseStream::new(c, transport, leftover);
        let mut got = [0u8; 2];
        cs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn read_response_message_error_and_garbage() {
        let (mut c, mut s) = duplex(4096);
        s.write_all(&error_message("go away")).await.unwrap();
        let mut leftover = Vec::new();
        let m = read_response_message(&mut c, &mut leftover).await.unwrap();
        assert_eq!(m, error_message("go away"));
        assert!(leftover.is_empty());

        let mut leftover = b"HTTP/1.1 400".to_vec();
        let e = read_response_message(&mut c, &mut leftover).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut leftover = vec![2, 0, 49];
        let e = read_response_message(&mut c, &mut leftover).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        s.write_all(&[2, 0, 48, 1, 2]).await.unwrap();
        drop(s);
        let e = read_response_message(&mut c, &mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Yields its bytes, then fails with `UnexpectedEof` (what TLS reports for a peer that went
    /// away without close_notify).
    struct EofWithoutNotify(Vec<u8>);

    impl AsyncRead for EofWithoutNotify {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            let n = buf.remaining().min(self.0.len());
            buf.put_slice(&self.0[..n]);
            self.0.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn tls_end_without_close_notify_ends_the_stream_cleanly_between_records() {
        use tokio::io::AsyncReadExt;
        for cut in [0usize, 3] {
            let (ct, mut st) = transports();
            let mut wire = Vec::new();
            st.seal(b"hello", &mut wire).unwrap();
            wire.truncate(wire.len() - cut);
            let mut c = NoiseStream::new(EofWithoutNotify(wire), ct, Vec::new());
            let mut got = Vec::new();
            let r = c.read_to_end(&mut got).await;
            if cut == 0 {
                assert_eq!((r.unwrap(), &got[..]), (5, &b"hello"[..]));
            } else {
                // A record cut short is still an error.
                assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
            }
        }
    }

    #[tokio::test]
    async fn early_payload_is_stripped_across_records() {
        let (mut c, mut s) = stream_pair(512);
        let json =
            br#"{"nodeKeyChallenge":"chalpub:0000000000000000000000000000000000000000000000000000000000000000"}"#;
        let ep = early_payload(json);
        // Split the payload over two records to exercise reassembly, then the h2 preface.
        s.write_all(&ep[..7]).await.unwrap();
        s.flush().await.unwrap();
        let server = async {
            s.write_all(&ep[7..]).await.unwrap();
            s.write_all(b"PRI * HTTP/2.0").await.unwrap();
            s.shutdown().await.unwrap();
        };
        let client = async {
            let got = c.strip_early_payload().await.unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
            (got, rest)
        };
        let ((), (got, rest)) = tokio::join!(server, client);
        assert_eq!(got.as_deref(), Some(&json[..]));
        assert_eq!(rest, b"PRI * HTTP/2.0");
    }

    #[tokio::test]
    async fn no_early_payload_keeps_bytes_for_h2() {
        let (mut c, mut s) = stream_pair(4096);
        // An HTTP/2 SETTINGS frame header: length 0, type 4, flags 0, stream 0.
        let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0, 0xaa];
        s.write_all(&settings).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(c.strip_early_payload().await.unwrap(), None);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, settings);

        // Fewer than 9 bytes before EOF: kept as is, no error.
        let (mut c, mut s) = stream_pair(4096);
        s.write_all(b"abc").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(c.strip_early_payload().await.unwrap(), None);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"abc");
    }

    #[tokio::test]
    async fn oversized_or_truncated_early_payload_is_an_error() {
        let (mut c, mut s) = stream_pair(4096);
        let mut hdr = early_payload(b"");
        hdr[5..9].copy_from_slice(&(MAX_EARLY_PAYLOAD_LEN as u32 + 1).to_be_bytes());
        s.write_all(&hdr).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            c.strip_early_payload().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        let (mut c, mut s) = stream_pair(4096);
        s.write_all(&early_payload(b"{\"a\":1}")[..12]).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            c.strip_early_payload().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn tampered_record_fails_the_read_side_for_good() {
        let (ct, mut st) = transports();
        let mut wire = Vec::new();
        st.seal(b"secret", &mut wire).unwrap();
        wire[5] ^= 1;
        let (c, mut s) = duplex(4096);
        let mut cs = NoiseStream::new(c, ct, Vec::new());
        s.write_all(&wire).await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(cs.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(cs.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn eof_mid_record_is_unexpected_eof() {
        let (ct, mut st) = transports();
        let mut wire = Vec::new();
        st.seal(b"partial", &mut wire).unwrap();
        let (c, mut s) = duplex(4096);
        let mut cs = NoiseStream::new(c, ct, Vec::new());
        s.write_all(&wire[..wire.len() - 1]).await.unwrap();
        drop(s);
        let mut out = Vec::new();
        assert_eq!(
            cs.read_to_end(&mut out).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn garbage_stream_is_invalid_data_not_a_panic() {
        let (ct, _) = transports();
        let (c, mut s) = duplex(4096);
        let mut cs = NoiseStream::new(c, ct, b"HTTP/1.1 200 OK\r\n".to_vec());
        drop(s.shutdown().await);
        let mut out = Vec::new();
        assert_eq!(
            cs.read_to_end(&mut out).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn h2_runs_over_the_stream() {
        let (c, s) = stream_pair(2048);
        let server = async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            // The handler runs as its own task because h2 only moves bytes while `conn` is polled.
            let handler = tokio::spawn(async move {
                let mut body = req.into_body();
                let mut got = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    got.extend_from_slice(&chunk);
                }
                let resp = http::Response::builder().status(200).body(()).unwrap();
                let mut send = respond.send_response(resp, false).unwrap();
                send.send_data(bytes::Bytes::from(got), true).unwrap();
            });
            // Drive the connection until the client goes away.
            while let Some(Ok(_)) = conn.accept().await {}
            handler.await.unwrap();
        };
        let client = async move {
            let (h2c, conn) = h2::client::handshake(c).await.unwrap();
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut h2c = h2c.ready().await.unwrap();
            let req = http::Request::builder()
                .method("POST")
                .uri("https://control/machine/map")
                .body(())
                .unwrap();
            let (resp, mut send) = h2c.send_request(req, false).unwrap();
            send.send_data(bytes::Bytes::from(pattern(20_000)), true).unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            drop(h2c);
            driver.abort();
            got
        };
        // A regression here tends to deadlock rather than fail, so bound it.
        let both = async { tokio::join!(server, client) };
        let ((), got) = tokio::time::timeout(std::time::Duration::from_secs(20), both)
            .await
            .unwrap();
        assert_eq!(got, pattern(20_000));
    }
}
