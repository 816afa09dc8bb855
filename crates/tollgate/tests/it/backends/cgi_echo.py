"""A Flask app served the CGI way (stdlib wsgiref), answering with what it read.

wsgiref turns each request field into an environ key `HTTP_<NAME>` with `-` read as `_` (PEP 3333),
so `X_Tollgate_Subject` and `X-Tollgate-Subject` become the same key; Flask (Werkzeug) upper-cases
the method, so `delete` is `DELETE` to it. The answer is JSON: the method, the path and the fields as
the app sees them. Binds port 0 and prints the port on stdout.
"""
import json
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from flask import Flask, request

app = Flask(__name__)
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@app.route("/", defaults={"rest": ""}, methods=METHODS)
@app.route("/<path:rest>", methods=METHODS)
def echo(rest):
    body = {
        "method": request.method,
        "path": request.path,
        "headers": {k.lower(): v for k, v in request.headers.items()},
    }
    return app.response_class(json.dumps(body), mimetype="application/json")


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


server = make_server("127.0.0.1", 0, app, WSGIServer, Quiet)
print(server.server_port, flush=True)
server.serve_forever()
