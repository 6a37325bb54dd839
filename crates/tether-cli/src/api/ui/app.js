// tether's web UI: the devices, one device's objects with Read / Write / Execute / Observe /
// Delete, live notifications and events (Server-Sent Events), DTLS statistics. Plain DOM, no
// framework, no build step; every value comes from the REST API with the login cookie.

const $ = (selector, root = document) => root.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ''));
  return node;
}

async function api(method, path, body) {
  const options = { method, credentials: 'same-origin', headers: {} };
  // Every change says it is JSON: the server refuses changes a cross-site form could send.
  if (method !== 'GET') options.headers['Content-Type'] = 'application/json';
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(path, options);
  const json = await response.json().catch(() => ({}));
  if (response.status === 401) {
    showLogin();
    throw new Error(json.error || 'not logged in');
  }
  if (!response.ok) throw new Error(json.error || `HTTP ${response.status}`);
  return json;
}

const state = {
  selected: null,
  clients: new Map(), // endpoint -> its latest listing
  models: new Map(),
  observations: new Map(), // observation id -> path
  events: null,
  timers: [],
};

// ---- login ----

function showLogin() {
  $('#main').hidden = true;
  $('#logout').hidden = true;
  $('#login').hidden = false;
  $('#role').textContent = '';
  stop();
}

async function login(event) {
  event.preventDefault();
  try {
    await api('POST', '/api/login', { token: $('#login-token').value.trim() });
    $('#login-token').value = '';
    $('#login-error').textContent = '';
    await start();
  } catch (error) {
    $('#login-error').textContent = error.message;
  }
}

async function logout() {
  await api('POST', '/api/logout').catch(() => {});
  showLogin();
}

// ---- devices ----

function seconds(value) {
  if (value === null || value === undefined) return '–';
  if (value < 90) return `${Math.round(value)} s`;
  if (value < 5400) return `${Math.round(value / 60)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

/// The cells of a device's row, in the order of the table's columns.
function deviceCells(client, session) {
  const queue = client.binding === 'UQ' ? ' (queue mode)' : '';
  return [
    client.endpoint,
    client.identity,
    client.address,
    client.binding + queue,
    `${client.lifetime_s} s`,
    seconds(client.last_heard_s_ago ?? client.updated_s_ago),
    client.online ? 'yes' : 'no',
    session ? seconds(session.age_s) : '–',
    session ? session.handshakes : '–',
  ];
}

/// Brings the device list up to date in place: a device keeps its row (keyed by endpoint)
/// and only the cells that changed are written, so a row someone is about to click is never
/// swapped for a copy.
async function refreshDevices() {
  const [clients, pool] = await Promise.all([api('GET', '/api/clients'), api('GET', '/api/pool')]);
  const sessions = new Map(pool.per_session.map((s) => [s.peer, s]));
  state.clients = new Map(clients.map((client) => [client.endpoint, client]));
  const body = $('#devices tbody');
  const rows = new Map([...body.children].map((row) => [row.dataset.endpoint, row]));
  let previous = null;
  for (const client of clients) {
    let row = rows.get(client.endpoint);
    rows.delete(client.endpoint);
    if (!row) {
      const endpoint = client.endpoint;
      row = element('tr', { 'data-endpoint': endpoint, onclick: () => select(state.clients.get(endpoint)) });
    }
    const cells = deviceCells(client, sessions.get(client.address));
    while (row.children.length < cells.length) row.append(element('td'));
    cells.forEach((text, i) => {
      const cell = row.children[i];
      if (cell.textContent !== String(text)) cell.textContent = String(text);
    });
    row.classList.toggle('offline', !client.online);
    row.classList.toggle('selected', client.endpoint === state.selected?.endpoint);
    const expected = previous ? previous.nextSibling : body.firstChild;
    if (row !== expected) body.insertBefore(row, expected);
    previous = row;
  }
  for (const gone of rows.values()) gone.remove();
  $('#device-count').textContent = `(${clients.length})`;
  renderStats(pool);
}

function renderStats(pool) {
  const rows = [
    ['sessions', `${pool.sessions} / ${pool.capacity}`],
    ['handshakes', pool.handshakes_total],
    ['in progress', pool.handshakes_in_progress],
    ['resumed', pool.dtls.handshakes_resumed],
    ['failed', pool.dtls.handshakes_failed],
    ['requests', pool.requests_total],
    ['expired', pool.expired_total],
    ['evicted', pool.evicted_total],
    ['migrations', pool.dtls.migrations],
    ['restored', pool.dtls.sessions_restored],
    ['datagrams in', pool.dtls.datagrams_received],
    ['dropped', pool.dtls.datagrams_dropped],
  ];
  for (const [reason, count] of Object.entries(pool.dtls.dropped_by_reason || {})) {
    if (count > 0) rows.push([`  ${reason}`, count]);
  }
  $('#stats').replaceChildren(...rows.flatMap(([name, value]) => [element('dt', {}, name), element('dd', {}, value)]));
}

// ---- one device ----

/// The object instances a registration lists (`</3/0>`), by object; objects listed without
/// instances get none.
function instancesOf(links) {
  const objects = new Map();
  for (const match of links.matchAll(/<\/([0-9]+)(?:\/([0-9]+))?>/g)) {
    const object = Number(match[1]);
    if (!objects.has(object)) objects.set(object, []);
    if (match[2] !== undefined) objects.get(object).push(Number(match[2]));
  }
  return objects;
}

async function model(object) {
  if (!state.models.has(object)) {
    state.models.set(object, await api('GET', `/api/objects/${object}`).catch(() => null));
  }
  return state.models.get(object);
}

function status(message, error = false) {
  const line = $('#device-status');
  line.textContent = message;
  line.className = error ? 'status error' : 'status';
}

async function select(client) {
  if (!client) return; // gone from the list since it was drawn
  state.selected = client;
  for (const row of document.querySelectorAll('#devices tbody tr')) {
    row.classList.toggle('selected', row.dataset.endpoint === client.endpoint);
  }
  $('#device-panel').hidden = false;
  $('#device-title').textContent = `${client.endpoint} — LwM2M ${client.lwm2m_version}, ${client.address}`;
  status('');
  const container = $('#objects');
  container.replaceChildren();
  for (const [object, instances] of instancesOf(client.objects)) {
    const described = await model(object);
    const name = described ? described.name : 'unknown object';
    for (const instance of instances) {
      container.append(instanceView(client.endpoint, object, instance, name, described));
    }
  }
}

function resourcePath(object, instance, resource) {
  return `/${object}/${instance}/${resource}`;
}

function instanceView(endpoint, object, instance, name, described) {
  const base = `/api/clients/${encodeURIComponent(endpoint)}`;
  const title = element(
    'h3',
    {},
    `/${object}/${instance} ${name} `,
    element('button', { class: 'read-all', onclick: () => read(base, `/${object}/${instance}`) }, 'Read all'),
    element('button', { class: 'delete', onclick: () => remove(base, `/${object}/${instance}`) }, 'Delete'),
  );
  const rows = (described ? described.resources : []).map((resource) => {
    const path = resourcePath(object, instance, resource.id);
    const ops = resource.operations;
    const buttons = element('td');
    if (ops.includes('R')) {
      buttons.append(element('button', { class: 'read', onclick: () => read(base, path) }, 'Read'));
      buttons.append(element('button', { class: 'observe', onclick: (e) => observe(base, path, e.target) }, 'Observe'));
    }
    if (ops.includes('W')) {
      buttons.append(element('button', { class: 'write', onclick: () => write(base, path, resource) }, 'Write'));
    }
    if (ops === 'E') {
      buttons.append(element('button', { class: 'execute', onclick: () => execute(base, path) }, 'Execute'));
    }
    return element(
      'tr',
      { 'data-path': path },
      element('td', {}, resource.id),
      element('td', {}, resource.name),
      element('td', { class: 'value' }, ''),
      element('td', {}, resource.units || ''),
      element('td', {}, `${ops} ${resource.type}`),
      buttons,
    );
  });
  return element('div', { class: 'object', 'data-instance': `/${object}/${instance}` }, title, element('table', {}, ...rows));
}

/// Shows `values` (path -> value) in their rows; a multiple resource's instances are joined.
function show(values, live = false) {
  const byResource = new Map();
  for (const [path, value] of Object.entries(values || {})) {
    const resource = path.split('/').slice(0, 4).join('/');
    if (!byResource.has(resource)) byResource.set(resource, []);
    byResource.get(resource).push(path.split('/').length > 4 ? `${path.split('/')[4]}: ${value}` : String(value));
  }
  for (const [resource, shown] of byResource) {
    const cell = document.querySelector(`tr[data-path="${resource}"] .value`);
    if (!cell) continue;
    cell.textContent = shown.join(', ');
    cell.classList.toggle('live', live);
  }
}

async function read(base, path) {
  status(`reading ${path}…`);
  try {
    const answer = await api('GET', `${base}${path}`);
    show(answer.values ?? { [path]: answer.value ?? answer.hex });
    status(`${path}: ${answer.coap_code}`);
  } catch (error) {
    status(`${path}: ${error.message}`, true);
  }
}

async function write(base, path, resource) {
  const text = window.prompt(`New value of ${path} (${resource.name}, ${resource.type})`);
  if (text === null) return;
  const numeric = ['Integer', 'Unsigned Integer', 'Float', 'Time'].includes(resource.type);
  const value = numeric && text.trim() !== '' && !Number.isNaN(Number(text)) ? Number(text) : text;
  const body = resource.type === 'Opaque' ? { hex: text } : { value };
  try {
    const answer = await api('PUT', `${base}${path}`, body);
    status(`${path} written: ${answer.coap_code}`);
    await read(base, path);
  } catch (error) {
    status(`${path}: ${error.message}`, true);
  }
}

async function execute(base, path) {
  try {
    const answer = await api('POST', `${base}${path}`);
    status(`${path} executed: ${answer.coap_code}`);
  } catch (error) {
    status(`${path}: ${error.message}`, true);
  }
}

async function observe(base, path, button) {
  const running = [...state.observations].find(([, watched]) => watched === path);
  try {
    if (running) {
      await api('DELETE', `/api/observations/${running[0]}`);
      state.observations.delete(running[0]);
      button.textContent = 'Observe';
      status(`${path}: observation cancelled`);
      return;
    }
    const answer = await api('POST', `${base}${path}/observe`);
    state.observations.set(answer.observation, path);
    show(answer.values ?? { [path]: answer.value }, true);
    button.textContent = 'Stop';
    status(`${path}: observing (observation ${answer.observation})`);
  } catch (error) {
    status(`${path}: ${error.message}`, true);
  }
}

async function remove(base, path) {
  if (!window.confirm(`Delete ${path} on the device?`)) return;
  try {
    const answer = await api('DELETE', `${base}${path}`);
    status(`${path} deleted: ${answer.coap_code}`);
  } catch (error) {
    status(`${path}: ${error.message}`, true);
  }
}

// ---- live events ----

const EVENTS = [
  'registered', 'updated', 'deregistered', 'expired', 'registration_refused',
  'session_opened', 'session_replaced', 'session_moved', 'session_closed',
  'notification', 'observation_ended', 'lagged',
];

let refreshSoon = null;

function onEvent(name, data) {
  const summary = data.endpoint ?? data.address ?? '';
  const detail = name === 'notification' ? JSON.stringify(data.values ?? data.value ?? '') : (data.reason ?? '');
  const list = $('#events');
  list.prepend(element('li', { class: name }, element('span', { class: 'name' }, name), `${summary} ${detail}`));
  while (list.children.length > 200) list.lastChild.remove();
  if (name === 'notification' && data.endpoint === state.selected?.endpoint) show(data.values, true);
  if (name !== 'notification' && !refreshSoon) {
    refreshSoon = setTimeout(() => {
      refreshSoon = null;
      refreshDevices().catch(() => {});
    }, 300);
  }
}

function listen() {
  state.events = new EventSource('/api/events');
  for (const name of EVENTS) {
    state.events.addEventListener(name, (event) => {
      let data = {};
      try {
        data = JSON.parse(event.data);
      } catch {
        data = { reason: event.data };
      }
      onEvent(name, data);
    });
  }
}

function stop() {
  state.events?.close();
  state.events = null;
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
}

async function start() {
  const who = await fetch('/api/whoami', { credentials: 'same-origin' }).then((r) => r.json());
  if (!who.role) {
    showLogin();
    return;
  }
  $('#role').textContent = who.authentication ? `${who.role} token` : 'no authentication';
  $('#logout').hidden = !who.authentication;
  $('#login').hidden = true;
  $('#main').hidden = false;
  stop();
  listen();
  await refreshDevices();
  state.timers.push(setInterval(() => refreshDevices().catch(() => {}), 10000));
}

$('#login-form').addEventListener('submit', login);
$('#logout').addEventListener('click', logout);
start().catch((error) => {
  $('#login-error').textContent = error.message;
  showLogin();
});
