'use strict';
'require view';
'require rpc';
'require poll';
'require ui';
'require dom';

// The coordinator on this router, through its ubus object `tinyscale.server`: users, nodes
// (route approval, delete) and pre-auth keys.

var callUsers = rpc.declare({ object: 'tinyscale.server', method: 'users' });
var callUserAdd = rpc.declare({ object: 'tinyscale.server', method: 'user_add', params: ['name'] });
var callNodes = rpc.declare({ object: 'tinyscale.server', method: 'nodes' });
var callNodeDelete = rpc.declare({ object: 'tinyscale.server', method: 'node_delete', params: ['id'] });
var callNodeRename = rpc.declare({ object: 'tinyscale.server', method: 'node_rename', params: ['id', 'name'] });
var callRouteApprove = rpc.declare({ object: 'tinyscale.server', method: 'route_approve', params: ['node', 'routes'] });
var callKeyAdd = rpc.declare({ object: 'tinyscale.server', method: 'preauthkey_add', params: ['user', 'reusable', 'ephemeral', 'expiration'] });
var callKeys = rpc.declare({ object: 'tinyscale.server', method: 'preauthkeys' });
var callKeyExpire = rpc.declare({ object: 'tinyscale.server', method: 'preauthkey_expire', params: ['key'] });
var callPolicyGet = rpc.declare({ object: 'tinyscale.server', method: 'policy_get' });
var callPolicyCheck = rpc.declare({ object: 'tinyscale.server', method: 'policy_check', params: ['policy'] });
var callPolicySet = rpc.declare({ object: 'tinyscale.server', method: 'policy_set', params: ['policy'] });

function checked(r) {
	if (r == null || typeof r != 'object')
		throw new Error(_('The coordinator did not answer (ubus status %s): is it running?').format(r));
	if (r.error)
		throw new Error(r.error);
	return r;
}

function fail(e) {
	ui.addNotification(null, E('p', e.message), 'danger');
}

function table(id, titles) {
	return E('table', { 'class': 'table', 'id': id }, E('tr', { 'class': 'tr table-titles' },
		titles.map(function(t) { return E('th', { 'class': 'th' }, t); })));
}

// Every button here writes: disabled for a session with read access only.
function button(cls, label, fn) {
	var b = E('button', { 'class': 'btn cbi-button ' + cls, 'click': ui.createHandlerFn(this, fn) }, label);
	b.disabled = (L.hasViewPermission() === false);
	return b;
}

return view.extend({
	load: function() {
		return this.fetch();
	},

	fetch: function() {
		return Promise.all([
			callUsers().then(checked),
			callNodes().then(checked),
			// The key list holds secrets: only write access may read it.
			callKeys().then(checked).catch(function() { return { preauthkeys: [] }; })
		]).catch(function(e) { return { error: e.message }; });
	},

	call: function(p) {
		var self = this;
		return p.then(checked).then(function() { return self.refresh(); }).catch(fail);
	},

	refresh: function() {
		return this.fetch().then(L.bind(this.update, this));
	},

	handleUserAdd: function() {
		var name = document.getElementById('tinyscale-new-user').value.trim();
		if (!name)
			return fail(new Error(_('Enter a user name.')));
		return this.call(callUserAdd(name));
	},

	handleRoutes: function(node, ev) {
		var routes = [];
		ev.target.closest('tr').querySelectorAll('input[data-route]').forEach(function(c) {
			if (c.checked)
				routes.push(c.getAttribute('data-route'));
		});
		this.editing = false;
		return this.call(callRouteApprove(node.id, routes));
	},

	handleDelete: function(node) {
		if (!confirm(_('Delete node %s? It has to log in again to rejoin.').format(node.given_name)))
			return;
		return this.call(callNodeDelete(node.id));
	},

	handleRename: function(node) {
		var name = prompt(_('New name for %s').format(node.given_name), node.given_name);
		if (name && name != node.given_name)
			return this.call(callNodeRename(node.id, name));
	},

	handleKeyAdd: function() {
		var v = function(id) { return document.getElementById(id); };
		var user = v('tinyscale-key-user').value;
		if (!user)
			return fail(new Error(_('Create a user first.')));
		var self = this;
		return callKeyAdd(user, v('tinyscale-key-reusable').checked, v('tinyscale-key-ephemeral').checked,
			v('tinyscale-key-expiration').value || '1h').then(checked).then(function(k) {
			self.showKey(k.key);
			return self.refresh();
		}).catch(fail);
	},

	handleKeyExpire: function(key) {
		return this.call(callKeyExpire(key));
	},

	showKey: function(key) {
		var field = E('input', { 'type': 'text', 'readonly': true, 'value': key, 'size': 60, 'id': 'tinyscale-key-new' });
		dom.content(document.getElementById('tinyscale-key-out'), [
			field, ' ',
			E('button', { 'class': 'btn cbi-button', 'click': function() {
				field.select();
				if (navigator.clipboard)
					navigator.clipboard.writeText(key).catch(function() { document.execCommand('copy'); });
				else
					document.execCommand('copy');
			} }, _('Copy'))
		]);
	},

	update: function(d) {
		var err = document.getElementById('tinyscale-error');
		dom.content(err, d.error ? E('p', { 'class': 'alert-message warning' }, d.error) : '');
		if (d.error)
			return;
		var users = d[0].users || [], nodes = d[1].nodes || [], keys = d[2].preauthkeys || [];
		var self = this;

		cbi_update_table(document.getElementById('tinyscale-users'), users.map(function(u) {
			return [u.id, u.name, u.created_at];
		}), E('em', _('No users yet')));

		cbi_update_table(document.getElementById('tinyscale-nodes'), nodes.map(function(n) {
			var all = (n.announced_routes || []).slice();
			(n.approved_routes || []).forEach(function(r) { if (all.indexOf(r) < 0) all.push(r); });
			var routes = all.map(function(r) {
				// An edit in progress pauses the refresh that would reset it.
				var c = E('input', { 'type': 'checkbox', 'data-route': r, 'change': function() { self.editing = true; } });
				c.checked = (n.approved_routes || []).indexOf(r) >= 0;
				return E('label', { 'style': 'display:block' }, [c, ' ', r]);
			});
			if (routes.length)
				routes.push(button.call(self, 'cbi-button-apply', _('Approve'), L.bind(self.handleRoutes, self, n)));
			return [
				n.id,
				n.given_name + (n.given_name != n.name ? ' (' + n.name + ')' : ''),
				n.user,
				(n.ip_addresses || []).join(', '),
				n.online ? _('yes') : _('no'),
				E('div', routes.length ? routes : '-'),
				E('div', [
					button.call(self, 'cbi-button-edit', _('Rename'), L.bind(self.handleRename, self, n)), ' ',
					button.call(self, 'cbi-button-remove', _('Delete'), L.bind(self.handleDelete, self, n))
				])
			];
		}), E('em', _('No nodes yet')));

		var sel = document.getElementById('tinyscale-key-user');
		var cur = sel.value;
		dom.content(sel, users.map(function(u) { return E('option', { 'value': u.name }, u.name); }));
		if (cur)
			sel.value = cur;

		cbi_update_table(document.getElementById('tinyscale-keys'), keys.map(function(k) {
			var live = !k.expired && !(k.used && !k.reusable);
			return [
				k.user,
				E('code', k.key.substr(0, 16) + '…'),
				[k.reusable ? _('reusable') : _('one use'), k.ephemeral ? _('ephemeral') : ''].join(' '),
				k.used ? _('yes') : _('no'),
				k.expiration || _('never'),
				live ? button.call(self, 'cbi-button-remove', _('Expire'), L.bind(self.handleKeyExpire, self, k.key)) : _('expired')
			];
		}), E('em', _('No keys')));
	},

	render: function(data) {
		var self = this;
		var ta = E('textarea', { 'id': 'tinyscale-policy', 'rows': 14, 'style': 'width:100%;font-family:monospace',
			'spellcheck': 'false', 'input': function() { self.policyEdited = true; } });
		var view = E([], [
			E('h2', _('Tinyscale coordinator')),
			E('div', { 'class': 'cbi-map-descr' }, _('Users, nodes, subnet routes and pre-auth keys of the control server on this router.')),
			E('div', { 'id': 'tinyscale-error' }),
			E('h3', _('Users')),
			table('tinyscale-users', [_('ID'), _('Name'), _('Created')]),
			E('div', { 'class': 'cbi-section' }, [
				E('input', { 'type': 'text', 'id': 'tinyscale-new-user', 'placeholder': _('user name') }), ' ',
				button.call(this, 'cbi-button-add', _('Add user'), 'handleUserAdd')
			]),
			E('h3', _('Nodes')),
			table('tinyscale-nodes', [_('ID'), _('Name'), _('User'), _('IPs'), _('Online'), _('Routes'), _('Actions')]),
			E('h3', _('Pre-auth keys')),
			E('div', { 'class': 'cbi-section' }, [
				E('select', { 'id': 'tinyscale-key-user' }), ' ',
				E('label', [E('input', { 'type': 'checkbox', 'id': 'tinyscale-key-reusable' }), ' ', _('reusable')]), ' ',
				E('label', [E('input', { 'type': 'checkbox', 'id': 'tinyscale-key-ephemeral' }), ' ', _('ephemeral')]), ' ',
				E('input', { 'type': 'text', 'id': 'tinyscale-key-expiration', 'value': '1h', 'style': 'width:6em', 'title': _('Expires after (e.g. 1h, 24h, 90d; 0 = never)') }), ' ',
				button.call(this, 'cbi-button-add', _('Create key'), 'handleKeyAdd'),
				E('div', { 'id': 'tinyscale-key-out', 'style': 'margin-top:.5em' })
			]),
			table('tinyscale-keys', [_('User'), _('Key'), _('Kind'), _('Used'), _('Expires'), _('Actions')]),
			E('h3', _('ACL policy')),
			E('div', { 'class': 'cbi-map-descr' }, _('headscale\'s policy format (HuJSON: comments and trailing commas allowed). Empty: every node reaches every node. It is checked before it is saved; a policy with errors is never applied.')),
			E('div', { 'class': 'cbi-section' }, [
				ta,
				E('div', { 'style': 'margin-top:.5em' }, [
					button.call(this, 'cbi-button-neutral', _('Check'), 'handlePolicyCheck'), ' ',
					button.call(this, 'cbi-button-save', _('Check and save'), 'handlePolicySave')
				]),
				E('div', { 'id': 'tinyscale-policy-out', 'style': 'margin-top:.5em' })
			])
		]);
		requestAnimationFrame(function() { self.update(data); });
		poll.add(function() { return self.editing ? Promise.resolve() : self.refresh(); }, 10);
		callPolicyGet().then(checked).then(function(r) {
			if (!self.policyEdited)
				ta.value = r.policy || '';
		}).catch(fail);
		return view;
	},

	// policy_check's answer shown under the editor; resolves to whether the text is valid.
	checkPolicy: function() {
		var text = document.getElementById('tinyscale-policy').value;
		var out = document.getElementById('tinyscale-policy-out');
		return callPolicyCheck(text).then(checked).then(function(r) {
			dom.content(out, r.valid ? E('em', _('The policy is valid.')) :
				E('ul', { 'class': 'alert-message warning' }, r.errors.map(function(e) {
					return E('li', _('line %d, column %d: %s').format(e.line, e.column, e.message));
				})));
			return r.valid ? text : null;
		});
	},

	handlePolicyCheck: function() {
		return this.checkPolicy().catch(fail);
	},

	handlePolicySave: function() {
		var self = this;
		return this.checkPolicy().then(function(text) {
			if (text == null)
				return;
			return callPolicySet(text).then(checked).then(function() {
				self.policyEdited = false;
				ui.addNotification(null, E('p', _('Policy saved: every node has its new filter.')), 'info');
			});
		}).catch(fail);
	},

	handleSave: null,
	handleSaveApply: null,
	handleReset: null
});
