'use strict';
'require view';
'require rpc';
'require poll';
'require ui';
'require dom';

// Status of the tinyscale daemon, from its ubus object `tinyscale` (see `ubus -v list tinyscale`).

var callStatus = rpc.declare({ object: 'tinyscale', method: 'status' });
var callPeers = rpc.declare({ object: 'tinyscale', method: 'peers' });
var callNetcheck = rpc.declare({ object: 'tinyscale', method: 'netcheck' });
var callLogin = rpc.declare({ object: 'tinyscale', method: 'login' });
var callUp = rpc.declare({ object: 'tinyscale', method: 'up' });
var callDown = rpc.declare({ object: 'tinyscale', method: 'down' });
var callLogout = rpc.declare({ object: 'tinyscale', method: 'logout' });

// A ubus answer: our methods reply with a table; an error is {error} or a bare ubus status code.
function checked(r) {
	if (r == null || typeof r != 'object')
		throw new Error(_('The tinyscale daemon did not answer (ubus status %s): is it running?').format(r));
	if (r.error)
		throw new Error(r.error);
	return r;
}

function bytes(n) {
	return (n == null) ? '-' : '%1024.2mB'.format(n);
}

function ago(secs) {
	if (secs == null)
		return _('never');
	return (secs < 60) ? _('%ds ago').format(secs) : '%t'.format(secs) + ' ' + _('ago');
}

// The QR code of the login URL as SVG, from the daemon's rows of 0/1 modules.
function qr(rows) {
	if (!rows || !rows.length)
		return '';
	var n = rows.length, d = '';
	rows.forEach(function(row, y) {
		for (var x = 0; x < n; x++)
			if (row.charAt(x) == '1')
				d += 'M' + (x + 4) + ' ' + (y + 4) + 'h1v1h-1z';
	});
	var svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ' + (n + 8) + ' ' + (n + 8) +
		'" width="200" height="200" shape-rendering="crispEdges"><rect width="100%" height="100%" fill="#fff"/>' +
		'<path d="' + d + '" fill="#000"/></svg>';
	var div = E('div', { 'class': 'tinyscale-qr' });
	div.innerHTML = svg;
	return div;
}

function path(p) {
	if (p.CurAddr)
		return _('direct') + ' (' + p.CurAddr + ')';
	if (p.Relay)
		return _('relay') + ' (DERP ' + p.Relay + ')';
	return '-';
}

function peerRows(peers) {
	return (peers || []).map(function(p) {
		return [
			E('span', { 'title': p.DNSName || '' }, p.HostName || '?'),
			(p.TailscaleIPs || []).join(', '),
			p.OS || '-',
			p.Online ? _('yes') : _('no'),
			path(p),
			ago(p.LastHandshakeSecs),
			bytes(p.RxBytes) + ' / ' + bytes(p.TxBytes),
			p.ExitNode ? _('in use') : (p.ExitNodeOption ? _('offered') : '-')
		];
	});
}

function netcheckText(n) {
	if (!n || n.result === null || n.UDP == null)
		return _('No report yet (the data plane runs once the node is up).');
	var parts = [
		'UDP: ' + (n.UDP ? _('yes') : _('no')),
		'IPv4: ' + (n.GlobalV4 || (n.IPv4 ? _('yes') : _('no'))),
		'IPv6: ' + (n.GlobalV6 || (n.IPv6 ? _('yes') : _('no'))),
		_('Nearest DERP') + ': ' + (n.PreferredDERP || '-')
	];
	if (n.MappingVariesByDestIP)
		parts.push(_('hard NAT (mapping varies by destination)'));
	var lat = Object.keys(n.RegionLatencyMs || {}).map(function(r) {
		return r + ': ' + n.RegionLatencyMs[r].toFixed(1) + ' ms';
	});
	if (lat.length)
		parts.push(_('DERP latency') + ' ' + lat.join(', '));
	return parts.join(' · ');
}

return view.extend({
	load: function() {
		return Promise.all([
			callStatus().then(checked).catch(function(e) { return { error: e.message }; }),
			L.resolveDefault(callNetcheck(), null)
		]);
	},

	action: function(fn, args) {
		return fn(args).then(checked).then(L.bind(this.refresh, this)).catch(function(e) {
			ui.addNotification(null, E('p', e.message), 'danger');
		});
	},

	handleLogin: function() {
		var self = this;
		return callLogin().then(checked).then(function(r) {
			self.login = r;
			self.asked = true;
			return self.refresh();
		}).catch(function(e) {
			ui.addNotification(null, E('p', e.message), 'danger');
		});
	},

	refresh: function() {
		var self = this;
		return Promise.all([
			callStatus().then(checked),
			callPeers().then(checked),
			L.resolveDefault(callNetcheck(), null)
		]).then(function(r) {
			r[0].Peer = r[1].Peer;
			self.update(r[0], r[2]);
		}).catch(function(e) {
			self.update({ error: e.message }, null);
		});
	},

	update: function(st, nc) {
		var info = document.getElementById('tinyscale-info');
		if (!info)
			return;
		if (st.error) {
			dom.content(info, E('p', { 'class': 'alert-message warning' }, st.error));
			return;
		}
		var self = st.Self || {};
		var url = st.AuthURL || (this.login && this.login.AuthURL) || '';
		var rows = [
			[_('State'), st.BackendState + (st.Error ? ' — ' + st.Error : '')],
			[_('Login server'), st.LoginServer || '-'],
			[_('Name'), self.DNSName || '-'],
			[_('Tailnet IPs'), (self.TailscaleIPs || []).join(', ') || '-'],
			[_('Exit node'), (st.Prefs && st.Prefs.exit_node) || _('none')],
			[_('Netcheck'), netcheckText(nc)]
		];
		var body = [E('table', { 'class': 'table' }, rows.map(function(r) {
			return E('tr', { 'class': 'tr' }, [
				E('td', { 'class': 'td left', 'width': '25%' }, r[0]),
				E('td', { 'class': 'td left' }, r[1])
			]);
		}))];
		if (url && st.BackendState != 'Running') {
			var q = (this.login && this.login.AuthURL == url) ? this.login.QR : null;
			// The QR code comes with `login`, which answers at once while a URL is pending
			// (write access only: a read-only session sees the link).
			if (!q && !this.asked) {
				this.asked = true;
				callLogin().then(checked).then(L.bind(function(r) {
					this.login = r;
					this.update(st, nc);
				}, this)).catch(function() {});
			}
			body.push(E('div', { 'class': 'cbi-section' }, [
				E('p', {}, _('Open this link to log in this router:')),
				E('p', {}, [E('a', { 'href': url, 'target': '_blank', 'rel': 'noreferrer' }, url)]),
				qr(q)
			]));
		}
		var actions = [];
		if (st.BackendState == 'Running' || st.BackendState == 'Starting')
			actions.push(E('button', { 'class': 'btn cbi-button cbi-button-reset', 'click': ui.createHandlerFn(this, 'action', callDown) }, _('Disconnect')));
		else if (st.BackendState == 'Stopped')
			actions.push(E('button', { 'class': 'btn cbi-button cbi-button-apply', 'click': ui.createHandlerFn(this, 'action', callUp) }, _('Connect')));
		// Never logged in (or logged out): Log in fetches the URL, or starts a login for one.
		if (st.BackendState == 'NeedsLogin' || st.BackendState == 'NoState' || (!self.DNSName && st.BackendState == 'Stopped'))
			actions.push(E('button', { 'class': 'btn cbi-button cbi-button-action', 'click': ui.createHandlerFn(this, 'handleLogin') }, _('Log in')));
		if (self.DNSName)
			actions.push(E('button', { 'class': 'btn cbi-button cbi-button-remove', 'click': ui.createHandlerFn(this, 'action', callLogout) }, _('Log out')));
		actions.forEach(function(b) { b.disabled = (L.hasViewPermission() === false); });
		body.push(E('div', { 'class': 'cbi-page-actions' }, actions));
		dom.content(info, body);

		var table = document.getElementById('tinyscale-peers');
		cbi_update_table(table, peerRows(st.Peer), E('em', _('No peers')));
	},

	render: function(data) {
		var view = E([], [
			E('h2', _('Tinyscale')),
			E('div', { 'class': 'cbi-map-descr' }, _('Mesh VPN status of this router.')),
			E('div', { 'class': 'cbi-section', 'id': 'tinyscale-info' }),
			E('h3', _('Peers')),
			E('table', { 'class': 'table', 'id': 'tinyscale-peers' }, [
				E('tr', { 'class': 'tr table-titles' }, [
					_('Name'), _('Tailnet IPs'), _('OS'), _('Online'), _('Path'),
					_('Last handshake'), _('RX / TX'), _('Exit node')
				].map(function(t) { return E('th', { 'class': 'th' }, t); }))
			])
		]);
		var self = this;
		requestAnimationFrame(function() {
			var st = data[0];
			if (!st.error && !st.Peer)
				st.Peer = [];
			self.update(st, data[1]);
		});
		poll.add(L.bind(this.refresh, this), 5);
		return view;
	},

	handleSave: null,
	handleSaveApply: null,
	handleReset: null
});
