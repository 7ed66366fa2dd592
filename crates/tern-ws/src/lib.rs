//! MQTT over WebSocket, for the broker and the client alike: the binary frames of a
//! WebSocket read as one byte stream (a packet may span frames, a frame may hold many), and
//! each write sent as one binary frame. Anything but binary frames ends the connection
//! [MQTT-6.0.0-1]; Ping/Pong are answered by tungstenite and skipped here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{Error, Message};

/// A WebSocket, or either half of one, as bytes: `S` is the frame stream (read side), the
/// frame sink (write side) or the whole `WebSocketStream` (both).
pub struct WsBytes<S> {
    frames: S,
    /// What is left of the last binary frame read.
    left: Bytes,
}

impl<S> WsBytes<S> {
    /// Reads and writes `frames` as bytes.
    pub fn new(frames: S) -> WsBytes<S> {
        WsBytes {
            frames,
            left: Bytes::new(),
        }
    }
}

impl<S: Stream<Item = Result<Message, Error>> + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.left.is_empty() {
                let n = self.left.len().min(buf.remaining());
                buf.put_slice(&self.left[..n]);
                self.left.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.frames).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.left = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // The peer closed: end of stream.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                // [MQTT-6.0.0-1]: anything but binary frames closes the connection.
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text frame on an MQTT WebSocket",
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: Sink<Message, Error = Error> + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut sink = Pin::new(&mut self.frames);
        ready!(sink.as_mut().poll_ready(cx)).map_err(io::Error::other)?;
        // Sent by the flush that follows each batch.
        sink.start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.frames)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.frames)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
