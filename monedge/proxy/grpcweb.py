"""
gRPC-Web translation (issue 16, item 5): a gRPC-Web call from a browser
goes to an HTTP/2 service (policy C{protocol: h2c} or C{h2}) as the gRPC
call it stands for, and the answer comes back in gRPC-Web's form, as
Envoy's grpc_web filter does.

- The request: C{content-type} becomes C{application/grpc}(+codec),
  C{te: trailers} is added, and a C{-text} body is base64-decoded as it
  streams (L{GrpcWebCall.body}), its length then unknown;
- the response (L{GrpcWebCall.response}): C{content-type} becomes the
  request's gRPC-Web type, its length unknown, its DATA relayed (base64-
  encoded for C{-text}), and the upstream's trailers become the body's
  last frame (L{monedge.rules.grpcweb.trailerFrame}); no HTTP trailers
  ever reach the client.

The codec is L{monedge.rules.grpcweb}'s; the exchange calls this at three
points (its body producer, its response, its failure).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from monedge.rules.errors import ProxyError
from monedge.rules.grpc import isGrpcContentType
from monedge.rules.grpcweb import (
    Base64Decoder,
    Base64Encoder,
    GrpcWebType,
    InvalidBase64,
    grpcWebType,
    trailerFrame,
)

_DONE = Failure(ResponseDone())

#: The upstream protocols that speak gRPC: a gRPC-Web call to any other
#: (C{http1}) goes as it came, for an upstream that may speak gRPC-Web.
TRANSLATED_PROTOCOLS = frozenset(["h2c", "h2"])


def grpcWebCall(headers: Headers, protocol: str) -> GrpcWebCall | None:
    """
    The translation of a request with the (client's) C{headers} to a
    service whose upstream C{protocol} is given; L{None} if there is none
    to make (not gRPC-Web, or an HTTP/1.1 service).
    """
    if protocol not in TRANSLATED_PROTOCOLS:
        return None
    types = headers.getRawHeaders(b"content-type")
    kind = grpcWebType(types[0]) if types else None
    return None if kind is None else GrpcWebCall(kind)


class GrpcWebCall:
    """
    One gRPC-Web call's translation.

    @ivar kind: the request's gRPC-Web type.
    @ivar invalid: why its C{-text} body could not be decoded, once it
        could not.
    """

    def __init__(self, kind: GrpcWebType) -> None:
        self.kind = kind
        self.invalid: InvalidBase64 | None = None

    def requestHeaders(self, headers: Headers) -> None:
        """
        Make C{headers} (those going upstream) a gRPC call's.
        """
        headers.setRawHeaders(b"content-type", [self.kind.upstream()])
        headers.setRawHeaders(b"te", [b"trailers"])
        if self.kind.text:
            # The body is decoded on its way: a quarter shorter.
            headers.removeHeader(b"content-length")

    def body(self, body: IBodyProducer | None) -> IBodyProducer | None:
        """
        The body to send upstream for the client's C{body}.
        """
        if body is None or not self.kind.text:
            return body
        return DecodingBody(body, self)

    def response(self, response: IResponse) -> IResponse:
        """
        The upstream's C{response}, as the client is to see it.
        """
        return GrpcWebResponse(response, self)

    def failed(self, failure: Failure) -> Failure:
        """
        The upstream request failed with C{failure}: a
        C{grpc_web_bad_base64} refusal instead, if that is why.
        """
        if self.invalid is not None:
            return Failure(ProxyError("grpc_web_bad_base64"))
        return failure

    def watch(self, d: Deferred[IResponse]) -> Deferred[IResponse]:
        """
        Translate the upstream request C{d}'s outcome, both ways; C{d}.
        """
        return d.addCallbacks(self.response, self.failed)


@implementer(IConsumer)
class _DecodingConsumer:
    """
    What a C{-text} body writes to: decodes it on to the upstream's
    consumer.
    """

    def __init__(self, consumer: IConsumer, body: DecodingBody) -> None:
        self._consumer = consumer
        self._body = body
        self.decoder = Base64Decoder()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self._body.stopped:
            return
        try:
            decoded = self.decoder.feed(data)
        except InvalidBase64 as e:
            self._body.invalid(e)
            return
        if decoded:
            self._consumer.write(decoded)


@implementer(IBodyProducer)
class DecodingBody:
    """
    A C{-text} request body, base64-decoded as it streams; its length is
    unknown.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, body: IBodyProducer, call: GrpcWebCall) -> None:
        self._body = body
        self._call = call
        self._result: Deferred[None] | None = None
        self.stopped = False

    @property
    def trailers(self) -> Any:
        """
        The client's request trailers, as the body has them.
        """
        return getattr(self._body, "trailers", ())

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        decoding = _DecodingConsumer(consumer, self)
        result: Deferred[None] = Deferred(self._cancelled)
        self._result = result

        def written(_: object) -> None:
            if result.called:
                return
            try:
                decoding.decoder.finish()
            except InvalidBase64 as e:
                self.invalid(e)
                return
            result.callback(None)

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        self._body.startProducing(decoding).addCallbacks(written, failed)
        return result

    def invalid(self, error: InvalidBase64) -> None:
        """
        The body is not base64: stop it, and fail its sending.
        """
        self._call.invalid = error
        self.stopped = True
        result = self._result
        self._body.stopProducing()
        if result is not None and not result.called:
            result.errback(Failure(error))

    def _cancelled(self, result: Deferred[None]) -> None:
        self.stopped = True
        result.errback(Failure(CancelledError()))
        self._body.stopProducing()

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self.stopped = True
        self._body.stopProducing()

    def replayable(self) -> bool:
        """
        Whether the client's body can be produced again (for a request the
        upstream did not process).
        """
        replayable = getattr(self._body, "replayable", None)
        return bool(replayable is not None and replayable())

    def again(self) -> DecodingBody:
        """
        The body again, from its first byte.
        """
        again: IBodyProducer = self._body.again()  # type: ignore[attr-defined]
        return DecodingBody(again, self._call)


@implementer(IResponse)
class GrpcWebResponse:
    """
    An upstream gRPC response as a gRPC-Web client is to see it.  A
    response that is not a gRPC one (not 200, or another content-type)
    keeps its head and body; none keeps HTTP trailers.
    """

    #: Never any HTTP trailers: a gRPC response's are in its body.
    monedgeTrailers = None

    def __init__(self, response: IResponse, call: GrpcWebCall) -> None:
        self._response = response
        self.code = response.code
        self.phrase = response.phrase
        self.version = response.version
        self.request = response.request
        self.previousResponse = response.previousResponse
        self.monedgeConnection = getattr(response, "monedgeConnection", None)
        headers = response.headers
        types = headers.getRawHeaders(b"content-type")
        kind = call.kind
        #: A gRPC answer: translated.
        self.grpc = (
            response.code == 200
            and bool(types)
            and isGrpcContentType(types[0])
            and grpcWebType(types[0]) is None
        )
        #: The response's text encoding, for C{-text} calls.
        self.encoder = Base64Encoder() if self.grpc and kind.text else None
        #: A trailers-only answer: its status is in its head, which keeps it.
        self.trailersOnly = headers.hasHeader(b"grpc-status")
        self.length: int | object = response.length
        if self.grpc:
            out = Headers()
            for name, values in headers.getAllRawHeaders():
                out.setRawHeaders(name, values)
            out.setRawHeaders(b"content-type", [kind.response()])
            out.removeHeader(b"content-length")
            self.headers = out
            self.length = UNKNOWN_LENGTH
        else:
            self.headers = headers

    @property
    def monedgeUpstreamTrailers(self) -> list[tuple[bytes, bytes]] | None:
        """
        The upstream's own trailers (C{grpc-status} among them), for what
        records the call: they reach the client in the body, not as
        L{monedgeTrailers}.
        """
        trailers: list[tuple[bytes, bytes]] | None = getattr(
            self._response, "monedgeTrailers", None
        )
        return trailers

    def encode(self, data: bytes) -> bytes:
        """
        C{data}, a piece of the upstream's body, as the client's.
        """
        encoder = self.encoder
        return data if encoder is None or not data else encoder.feed(data)

    def end(self) -> bytes:
        """
        What ends the client's body once the upstream's has ended: the
        trailer frame (for a gRPC answer with trailers), and the rest of
        the text encoding.
        """
        if not self.grpc:
            return b""
        tail = b""
        trailers = getattr(self._response, "monedgeTrailers", None)
        if trailers and not self.trailersOnly:
            tail = trailerFrame(trailers)
        encoder = self.encoder
        if encoder is None:
            return tail
        return encoder.feed(tail) + encoder.finish()

    def deliverBody(self, protocol: Any) -> None:
        self._response.deliverBody(_EncodingProtocol(protocol, self))

    def monedgeTakeBody(self) -> bytes | None:
        """
        The whole body, translated, if it came whole with the head.
        """
        take = getattr(self._response, "monedgeTakeBody", None)
        body: bytes | None = take() if take is not None else None
        if body is None:
            return None
        return self.encode(body) + self.end()

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


class _EncodingProtocol(Protocol):
    """
    Reads an upstream gRPC body for a gRPC-Web client's reader: each piece
    encoded, and the trailer frame at the end.
    """

    def __init__(self, protocol: Any, response: GrpcWebResponse) -> None:
        self._protocol = protocol
        self._response = response

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        out = self._response.encode(data)
        if out:
            self._protocol.dataReceived(out)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            tail = self._response.end()
            if tail:
                self._protocol.dataReceived(tail)
        self._protocol.connectionLost(reason)
