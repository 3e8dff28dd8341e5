#!/bin/sh
# Checks openwrt/files/tinyscale.init (and the firewall uci-defaults guard) without OpenWrt: sources it with rc.common-style stubs
# for procd_*, config_* and uci that record what the script asks procd for, then compares
# that record with the expected one for several sample configs. Pure shell, no daemons.
#
# Usage: scripts/openwrt-init-test.sh   (prints `N passed, N failed`; exit 1 on a failure)

set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
INIT="$ROOT/openwrt/files/tinyscale.init"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT INT TERM
pass=0
fail=0

sh -n "$INIT" || { echo "sh -n failed: $INIT"; exit 1; }

# A stand-in binary: records its arguments, exits with $FAKE_RC.
cat > "$T/tinyscale" <<'STUB'
#!/bin/sh
echo "exec tinyscale $*" >> "$TRACE"
exit "${FAKE_RC:-0}"
STUB
chmod +x "$T/tinyscale"

# One scenario in a subshell: $1 name, $2 the rc.common action (start|reload|triggers),
# config from the SECTIONS ("type:name …") and CFG_<section>_<option> variables.
run() {
	TRACE="$T/trace"
	export TRACE
	: > "$TRACE"
	(
		rec() { echo "$*" >> "$TRACE"; }
		# config_* as /lib/functions.sh behaves: empty means unset, so the default applies.
		config_load() { rec "config_load $*"; }
		config_foreach() {
			local fn="$1" type="$2" s
			for s in $SECTIONS; do
				[ "${s%%:*}" = "$type" ] && "$fn" "${s#*:}"
			done
			return 0
		}
		config_get() {
			local __v
			eval "__v=\${CFG_$2_$3:-}"
			eval "$1=\${__v:-\${4:-}}"
		}
		config_get_bool() {
			local __b
			config_get __b "$2" "$3" "${4:-0}"
			case "$__b" in
			1 | on | true | yes | enabled) __b=1 ;;
			*) __b=0 ;;
			esac
			eval "$1=\$__b"
		}
		uci() {
			rec "uci $*"
			case "$*" in *show*) echo "tinyscale.main=server" ;; esac
		}
		logger() { rec "logger $*"; }
		procd_open_service() { rec "procd_open_service $*"; }
		procd_close_service() { rec "procd_close_service"; }
		procd_open_instance() { rec "procd_open_instance $*"; }
		procd_close_instance() { rec "procd_close_instance"; }
		procd_set_param() { rec "procd_set_param $*"; }
		procd_append_param() { rec "procd_append_param $*"; }
		procd_add_reload_trigger() { rec "procd_add_reload_trigger $*"; }
		procd_add_reload_interface_trigger() { rec "procd_add_reload_interface_trigger $*"; }
		# rc.common (USE_PROCD): start wraps start_service in a service; reload calls
		# reload_service when defined.
		rc_procd() {
			procd_open_service tinyscale /etc/init.d/tinyscale
			"$@"
			procd_close_service
		}
		start() { rc_procd start_service "$@"; }
		. "$INIT"
		PROG="$T/tinyscale"
		DNSMASQ_INIT="$T/dnsmasq"
		case "$1" in
		start) start ;;
		reload) reload_service ;;
		stop) stop_service ;;
		triggers) service_triggers ;;
		esac
	)
}

# Compares the trace with stdin; $1 names the case.
expect() {
	# @SUM@: the checksum the init script takes of the stub's `uci show tinyscale.main`.
	sed -e "s#@T@#$T#g" -e "s#@SUM@#$(echo tinyscale.main=server | md5sum | cut -d' ' -f1)#g" > "$T/want"
	if diff -u "$T/want" "$TRACE" > "$T/diff"; then
		pass=$((pass + 1))
		echo "ok   $1"
	else
		fail=$((fail + 1))
		echo "FAIL $1"
		cat "$T/diff"
	fi
}

# The packaged default: client on with defaults, coordinator off.
SECTIONS="client:client server:main"
CFG_client_enabled=1
CFG_main_enabled=0
run start
expect "default config starts the client only" <<'W'
procd_open_service tinyscale /etc/init.d/tinyscale
config_load tinyscale
procd_open_instance client
procd_set_param command @T@/tinyscale daemon --config /etc/config/tinyscale --port 41641 --state-dir /etc/tinyscale --tun tinyscale0
procd_set_param env TINYSCALE_LOG=info
procd_set_param respawn 3600 5 5
procd_set_param stdout 1
procd_set_param stderr 1
procd_close_instance
procd_close_service
W

# Coordinator on, daemon settings changed: both instances, the command line and environment
# carry the changes (procd restarts on those, not on data).
CFG_main_enabled=1
CFG_client_port=41700
CFG_client_tun=ts1
CFG_client_state_dir=/srv/ts
CFG_client_log_level=debug
run start
expect "coordinator enabled adds the server instance" <<'W'
procd_open_service tinyscale /etc/init.d/tinyscale
config_load tinyscale
procd_open_instance client
procd_set_param command @T@/tinyscale daemon --config /etc/config/tinyscale --port 41700 --state-dir /srv/ts --tun ts1
procd_set_param env TINYSCALE_LOG=debug
procd_set_param respawn 3600 5 5
procd_set_param stdout 1
procd_set_param stderr 1
procd_close_instance
procd_open_instance server
procd_set_param command @T@/tinyscale server --config /etc/config/tinyscale serve
uci -q show tinyscale.main
procd_set_param env TINYSCALE_SECTION_SUM=@SUM@
procd_set_param respawn 3600 5 5
procd_set_param stdout 1
procd_set_param stderr 1
procd_close_instance
procd_close_service
W

# reload: re-register (procd decides about restarts), then hand the daemon its prefs.
CFG_main_enabled=0
CFG_client_port='' CFG_client_tun='' CFG_client_state_dir='' CFG_client_log_level=''
run reload
expect "reload re-registers and applies prefs" <<'W'
procd_open_service tinyscale /etc/init.d/tinyscale
config_load tinyscale
procd_open_instance client
procd_set_param command @T@/tinyscale daemon --config /etc/config/tinyscale --port 41641 --state-dir /etc/tinyscale --tun tinyscale0
procd_set_param env TINYSCALE_LOG=info
procd_set_param respawn 3600 5 5
procd_set_param stdout 1
procd_set_param stderr 1
procd_close_instance
procd_close_service
config_load tinyscale
exec tinyscale up --config /etc/config/tinyscale
exec tinyscale debug dns-uci
W

# A refused `up` is logged, not fatal.
FAKE_RC=3
export FAKE_RC
run reload
grep logger "$TRACE" > "$T/last"
TRACE="$T/last"
expect "reload logs a refused up" <<'W'
logger -t tinyscale reload: prefs not applied (daemon restarting or config invalid; see logread)
W
FAKE_RC=0

# metrics_listen becomes the daemon's --metrics-listen.
CFG_client_metrics_listen=127.0.0.1:5252
run start
expect "metrics_listen is passed to the daemon" <<'W'
procd_open_service tinyscale /etc/init.d/tinyscale
config_load tinyscale
procd_open_instance client
procd_set_param command @T@/tinyscale daemon --config /etc/config/tinyscale --port 41641 --state-dir /etc/tinyscale --tun tinyscale0
procd_append_param command --metrics-listen 127.0.0.1:5252
procd_set_param env TINYSCALE_LOG=info
procd_set_param respawn 3600 5 5
procd_set_param stdout 1
procd_set_param stderr 1
procd_close_instance
procd_close_service
W
CFG_client_metrics_listen=

# Client disabled (and an anonymous section): no instance, no `up`.
SECTIONS="client:cfg01 server:main"
CFG_cfg01_enabled=0
run reload
expect "disabled client: no instance, no up" <<'W'
procd_open_service tinyscale /etc/init.d/tinyscale
config_load tinyscale
procd_close_service
config_load tinyscale
W

# No client section at all behaves as disabled.
SECTIONS="server:main"
run start
expect "no client section starts nothing" <<'W'
procd_open_service tinyscale /etc/init.d/tinyscale
config_load tinyscale
procd_close_service
W

# stop takes the dnsmasq forwarding out (the daemon is not asked).
run stop
expect "stop removes the MagicDNS forwarding from dhcp" <<'W'
exec tinyscale debug dns-uci --remove
W

# A non-empty batch goes to uci and dnsmasq reloads; an empty one touches nothing.
cat > "$T/tinyscale" <<'STUB'
#!/bin/sh
echo "exec tinyscale $*" >> "$TRACE"
echo "del_list dhcp.@dnsmasq[0].server='/ts.example/100.100.100.100'"
STUB
printf '#!/bin/sh\necho "exec dnsmasq $*" >> "$TRACE"\n' > "$T/dnsmasq"
chmod +x "$T/dnsmasq"
run stop
expect "stop applies a non-empty batch and reloads dnsmasq" <<'W'
exec tinyscale debug dns-uci --remove
uci -q batch
uci -q commit dhcp
exec dnsmasq reload
W
cat > "$T/tinyscale" <<'STUB'
#!/bin/sh
echo "exec tinyscale $*" >> "$TRACE"
exit "${FAKE_RC:-0}"
STUB

run triggers
expect "triggers: config and lan/wan" <<'W'
procd_add_reload_trigger tinyscale
procd_add_reload_interface_trigger lan
procd_add_reload_interface_trigger wan
W

# The firewall uci-defaults guard, with a fake `uci` on PATH (the batch itself is checked
# against fw4's default config by tests/openwrt.rs).
FW="$ROOT/openwrt/files/tinyscale.uci-defaults"
sh -n "$FW" || { echo "sh -n failed: $FW"; exit 1; }
mkdir -p "$T/bin"
cat > "$T/bin/uci" <<'STUB'
#!/bin/sh
case "$*" in
"-q get firewall.tinyscale") [ "$FAKE_FW" = ours ] && echo zone && exit 0; exit 1 ;;
"-q show firewall")
	echo "firewall.cfg01=zone"
	echo "firewall.cfg01.name='lan'"
	[ "$FAKE_FW" = tailnet ] && echo "firewall.cfg09.name='tailnet'"
	[ "$FAKE_FW" = device ] && echo "firewall.cfg09.device='tun0' 'tinyscale0'"
	exit 0 ;;
"-q batch") echo "uci batch: $(grep -c . | tr -d ' ') lines" >> "$TRACE"; exit 0 ;;
esac
echo "uci $*" >> "$TRACE"
STUB
cat > "$T/bin/logger" <<'STUB'
#!/bin/sh
echo "logger $*" >> "$TRACE"
STUB
chmod +x "$T/bin/uci" "$T/bin/logger"
fw() {
	: > "$TRACE"
	(cd "$T" && FAKE_FW="$1" PATH="$T/bin:$PATH" sh -c '. "$0"' "$FW") || echo "exit $?" >> "$TRACE"
}
TRACE="$T/trace"
fw none
expect "firewall: fresh config gets the batch" <<'W'
uci batch: 18 lines
W
fw ours
expect "firewall: our zone exists (maybe edited): untouched" < /dev/null
fw tailnet
expect "firewall: a user zone named tailnet: untouched" <<'W'
logger -t tinyscale firewall: a zone named tailnet or covering tinyscale0 exists; not adding ours
W
fw device
expect "firewall: a user zone covering tinyscale0: untouched" <<'W'
logger -t tinyscale firewall: a zone named tailnet or covering tinyscale0 exists; not adding ours
W

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
