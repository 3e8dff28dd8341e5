'use strict';
'require view';
'require form';
'require rpc';

// Settings: the `config client` section of /etc/config/tinyscale (the coordinator's switch
// too). Saving and applying reloads the service, which hands the daemon the new prefs.

var callPeers = rpc.declare({ object: 'tinyscale', method: 'peers' });

return view.extend({
	load: function() {
		// Exit node choices: peers the coordinator approved as exit nodes.
		return L.resolveDefault(callPeers(), {});
	},

	render: function(peers) {
		var m, s, o;

		m = new form.Map('tinyscale', _('Tinyscale'),
			_('Mesh VPN client of this router. Changes are applied to the running daemon on Save & Apply.'));

		s = m.section(form.TypedSection, 'client', _('Client'));
		s.anonymous = true;
		s.addremove = false;
		s.tab('general', _('General'));
		s.tab('routing', _('Routing'));
		s.tab('advanced', _('Advanced'));

		o = s.taboption('general', form.Flag, 'enabled', _('Enabled'));
		o.default = '1';
		o.rmempty = false;

		o = s.taboption('general', form.Value, 'login_server', _('Login server'),
			_('Control server URL: headscale, a tinyscale coordinator, or https://controlplane.tailscale.com.'));
		o.placeholder = 'https://hs.example.com';

		o = s.taboption('general', form.Value, 'auth_key', _('Auth key'),
			_('Pre-auth key for unattended login; leave empty to log in from the Status page.'));
		o.password = true;

		o = s.taboption('general', form.Value, 'hostname', _('Host name'),
			_('Name in the tailnet; empty uses the system host name.'));
		o.datatype = 'hostname';

		o = s.taboption('general', form.Flag, 'shields_up', _('Shields up'),
			_('Refuse every incoming connection from the tailnet.'));

		o = s.taboption('general', form.Flag, 'accept_dns', _('Accept DNS'),
			_('Answer tailnet names (MagicDNS) through dnsmasq.'));
		o.default = '1';

		o = s.taboption('routing', form.Flag, 'advertise_lan', _('Advertise LAN'),
			_('Offer the prefixes configured on the LAN device to the tailnet.'));
		o.default = '1';

		o = s.taboption('routing', form.Value, 'lan_device', _('LAN device'));
		o.placeholder = 'br-lan';
		o.depends('advertise_lan', '1');

		o = s.taboption('routing', form.DynamicList, 'advertise_routes', _('Advertised routes'),
			_('More prefixes to offer, e.g. 10.9.0.0/16. The coordinator has to approve them.'));
		o.datatype = 'cidr';

		o = s.taboption('routing', form.Flag, 'snat_subnet_routes', _('Masquerade subnet traffic'),
			_('Tailnet traffic to advertised subnets leaves with this router\'s address.'));
		o.default = '1';

		o = s.taboption('routing', form.Flag, 'accept_routes', _('Accept routes'),
			_('Use the subnet routes other nodes advertise.'));

		o = s.taboption('routing', form.Flag, 'advertise_exit_node', _('Offer as exit node'));

		o = s.taboption('routing', form.ListValue, 'exit_node', _('Exit node'),
			_('Send internet traffic through this peer.'));
		o.value('', _('none'));
		(peers.Peer || []).forEach(function(p) {
			var ip = (p.TailscaleIPs || [])[0];
			if (ip && p.ExitNodeOption)
				o.value(ip, '%s (%s)%s'.format(p.HostName, ip, p.Online ? '' : ' — ' + _('offline')));
		});
		o.cfgvalue = function(section_id) {
			var v = form.ListValue.prototype.cfgvalue.apply(this, [section_id]);
			// A configured node that is not offered (right now) stays selectable.
			if (v && this.keylist.indexOf(v) < 0)
				this.value(v, v);
			return v;
		};

		o = s.taboption('routing', form.Flag, 'exit_node_allow_lan_access', _('LAN access beside the exit node'));
		o.depends({ exit_node: '', '!reverse': true });

		o = s.taboption('advanced', form.Value, 'port', _('UDP port'));
		o.datatype = 'port';
		o.placeholder = '41641';

		o = s.taboption('advanced', form.Value, 'tun', _('Tunnel device'));
		o.placeholder = 'tinyscale0';

		o = s.taboption('advanced', form.ListValue, 'log_level', _('Log level'));
		['error', 'warn', 'info', 'debug'].forEach(function(l) { o.value(l); });
		o.default = 'info';

		s = m.section(form.NamedSection, 'main', 'server', _('Coordinator'),
			_('Run a control server with DERP relay on this router; its page appears under VPN once enabled.'));
		s.addremove = false;

		o = s.option(form.Flag, 'enabled', _('Enabled'));
		o.rmempty = false;

		o = s.option(form.Value, 'server_url', _('Server URL'), _('The URL clients use to reach it.'));
		o.placeholder = 'http://192.168.1.1:8080';

		o = s.option(form.Value, 'listen_addr', _('Listen address'));
		o.placeholder = '0.0.0.0:8080';

		return m.render();
	}
});
