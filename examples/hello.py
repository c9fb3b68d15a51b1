from typing import Any

from ferroxy import Peer, Proxy, Response, ResponseHeader, Session


class App(Proxy):
    def upstream_peer(self, session: Session, ctx: Any) -> Peer:
        return Peer("127.0.0.1:8081")

    async def request_filter(self, session: Session, ctx: Any) -> Response | None:
        if session.req.path == "/blocked":
            return Response(403, body=b"blocked\n")
        return None

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        upstream_response.headers["x-served-by"] = "ferroxy"
