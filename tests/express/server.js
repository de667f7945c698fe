'use strict'
// A real Express 4 backend for the gateway's tests (started by tests/express_fixtures.py).
//
//   node server.js --port P --control-port C [--exit-with-stdin]
//
// Public port (the upstream the gateway proxies to): `express.json()` with its DEFAULT options,
// as a typical backend mounts it, and the Flashback conversation routes. Every request is
// recorded as the backend saw it: {method, originalUrl, path, params, headers, rawHeaders,
// body, rawBodyBase64} (+ `error` when body-parser refused it), `body` being req.body exactly as
// express.json() left it (undefined -> null).
//
// Control port (never behind the gateway), JSON over HTTP:
//   GET  /received   the records, in arrival order
//   POST /reset      forget the records and the programmed answers
//   POST /answer     {route: "prompt"|"messages"|"conversations"|"other", status, headers,
//                     body | bodyBase64 | chunks | chunksBase64, chunkDelayMs, delayMs}
//                    programs the answer of a route until the next reset.
// Both listen on 127.0.0.1; one line `ready` on stdout once both do.

const http = require('http')
const express = require('express')

const ROUTES = ['prompt', 'messages', 'conversations', 'other']
const RAW_CAPTURE_LIMIT = 16 * 1024 * 1024

function parseArgs (argv) {
  const options = {}
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i]
    if (name === '--port' || name === '--control-port') {
      const value = Number(argv[++i])
      if (!Number.isInteger(value) || value < 0 || value > 65535) {
        throw new Error(`${name} needs a port number, got ${JSON.stringify(argv[i])}`)
      }
      options[name === '--port' ? 'port' : 'controlPort'] = value
    } else if (name === '--exit-with-stdin') {
      options.exitWithStdin = true
    } else {
      throw new Error(`unknown argument ${JSON.stringify(name)}`)
    }
  }
  if (options.port === undefined || options.controlPort === undefined) {
    throw new Error('usage: node server.js --port P --control-port C [--exit-with-stdin]')
  }
  return options
}

const state = {
  received: [],
  answers: {},
  created: 0
}

function reset () {
  state.received = []
  state.answers = {}
  state.created = 0
}

// ---------------------------------------------------------------- recording

// Keeps the raw request bytes (after HTTP framing, before any Content-Encoding is undone) next to
// what the parser made of them. A 'data' listener added before express.json() runs does not change
// what it reads: the stream only starts flowing on the next tick, once body-parser listens too.
function captureRawBody (req, res, next) {
  const chunks = []
  let size = 0
  req.on('data', (chunk) => {
    if (size < RAW_CAPTURE_LIMIT) chunks.push(chunk)
    size += chunk.length
  })
  req.rawBody = () => Buffer.concat(chunks)
  next()
}

// Calls `then` once the whole request has been read (a route may answer before the body is read
// when express.json() skipped it: GET, another Content-Type).
function whenRead (req, then) {
  if (req.complete || req.readableEnded) {
    then()
    return
  }
  let called = false
  const once = () => {
    if (!called) {
      called = true
      then()
    }
  }
  req.on('end', once)
  req.on('error', once)
  req.resume()
}

function record (req, extra) {
  const entry = {
    method: req.method,
    originalUrl: req.originalUrl,
    path: req.path,
    params: { ...req.params },
    headers: { ...req.headers },
    rawHeaders: pairs(req.rawHeaders),
    body: req.body === undefined ? null : req.body,
    rawBodyBase64: req.rawBody ? req.rawBody().toString('base64') : null,
    ...extra
  }
  state.received.push(entry)
  return entry
}

function pairs (flat) {
  const out = []
  for (let i = 0; i + 1 < flat.length; i += 2) out.push([flat[i], flat[i + 1]])
  return out
}

// ---------------------------------------------------------------- answering

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function sendProgrammed (res, program) {
  if (program.delayMs > 0) await sleep(program.delayMs)
  // Exactly the programmed headers: nothing Express set beforehand (X-Powered-By) survives.
  for (const name of res.getHeaderNames()) res.removeHeader(name)
  const headers = { ...(program.headers || {}) }
  const names = Object.keys(headers).map((name) => name.toLowerCase())
  if (program.chunks) {
    res.writeHead(program.status, headers)
    for (let i = 0; i < program.chunks.length; i++) {
      if (res.destroyed || res.writableEnded) return
      if (i > 0 && program.chunkDelayMs > 0) await sleep(program.chunkDelayMs)
      if (res.destroyed) return
      res.write(program.chunks[i])
    }
    res.end()
    return
  }
  const body = program.body || Buffer.alloc(0)
  if (!names.includes('content-length') && !names.includes('transfer-encoding')) {
    headers['Content-Length'] = String(body.length)
  }
  res.writeHead(program.status, headers)
  res.end(body)
}

function answer (route, req, res, fallback) {
  whenRead(req, () => {
    record(req)
    const program = state.answers[route]
    if (program === undefined) {
      fallback()
      return
    }
    sendProgrammed(res, program).catch((error) => {
      console.error(error)
      res.destroy(error)
    })
  })
}

// ---------------------------------------------------------------- default answers (Flashback's shapes)

const CREATED_AT = '2026-01-05T09:30:00.000Z'
const UPDATED_AT = '2026-01-05T09:31:12.000Z'

const CONVERSATIONS = [
  {
    id: 'c1',
    orgId: 'org-1',
    workspaceId: 'ws-1',
    repoId: 'repo-1',
    createdBy: 'user-1',
    createdAt: CREATED_AT,
    lastUpdatedAt: UPDATED_AT,
    tokensIn: '42',
    tokensOut: '128',
    title: 'Release notes',
    repo: { id: 'repo-1', name: 'platform' }
  },
  {
    id: 'c2',
    orgId: 'org-1',
    workspaceId: 'ws-2',
    repoId: 'repo-2',
    createdBy: 'user-1',
    createdAt: CREATED_AT,
    lastUpdatedAt: UPDATED_AT,
    tokensIn: '7',
    tokensOut: '19',
    title: 'Onboarding',
    repo: { id: 'repo-2', name: 'docs' }
  }
]

function defaultMessages (conversationId) {
  return {
    success: true,
    title: 'Release notes',
    messages: [
      {
        id: 'm1',
        conversationId,
        role: 'user',
        content: 'Summarise our release notes',
        tokenCount: 5,
        model: 'gpt-4o',
        createdAt: CREATED_AT
      },
      {
        id: 'm2',
        conversationId,
        role: 'assistant',
        content: 'The release adds streaming answers and fixes two bugs.',
        tokenCount: 11,
        model: 'gpt-4o',
        metadata: {},
        createdAt: UPDATED_AT
      }
    ]
  }
}

function listConversations (query) {
  const take = Math.min(Math.max(parseInt(query.take, 10) || 50, 1), 100)
  const skip = Math.max(parseInt(query.skip, 10) || 0, 0)
  let matching = CONVERSATIONS
  for (const key of ['workspaceId', 'repoId']) {
    if (typeof query[key] === 'string') matching = matching.filter((c) => c[key] === query[key])
  }
  return { success: true, conversations: matching.slice(skip, skip + take), total: matching.length }
}

// ---------------------------------------------------------------- public app

function publicApp () {
  const app = express()
  app.use(captureRawBody)
  app.use(express.json())

  app.post('/conversation/:conversationId/prompt', (req, res) => {
    answer('prompt', req, res, () => res.json({ success: true, message: 'Prompt received' }))
  })
  app.get('/conversation/:conversationId/messages', (req, res) => {
    answer('messages', req, res, () => res.json(defaultMessages(req.params.conversationId)))
  })
  app.get('/conversation', (req, res) => {
    answer('conversations', req, res, () => res.json(listConversations(req.query)))
  })
  app.post('/conversation', (req, res) => {
    answer('conversations', req, res, () => {
      state.created += 1
      res.json({ success: true, conversationId: `conv-${state.created}` })
    })
  })
  app.use((req, res) => {
    answer('other', req, res, () => res.status(404).json({ success: false, message: 'Not found' }))
  })

  // What a real backend does with body-parser's errors (400 bad JSON or charset-less garbage,
  // 413 over the limit, 415 charset or Content-Encoding): the error's status and message.
  app.use((err, req, res, next) => {
    const status = Number.isInteger(err.status) && err.status >= 400 && err.status < 600 ? err.status : 500
    whenRead(req, () => {
      record(req, { error: { status, message: String(err.message), type: err.type || null } })
      if (res.headersSent) {
        res.destroy()
        return
      }
      res.status(status).json({ success: false, message: String(err.message) })
    })
  })
  return app
}

// ---------------------------------------------------------------- control app

function decodeProgram (spec) {
  if (spec === null || typeof spec !== 'object') throw new Error('the program must be a JSON object')
  if (!ROUTES.includes(spec.route)) throw new Error(`route must be one of ${ROUTES.join(', ')}`)
  const status = spec.status === undefined ? 200 : spec.status
  if (!Number.isInteger(status) || status < 100 || status > 999) throw new Error('status must be an integer')
  const headers = spec.headers === undefined || spec.headers === null ? {} : spec.headers
  if (typeof headers !== 'object' || Array.isArray(headers)) throw new Error('headers must be an object')
  const bodies = ['body', 'bodyBase64', 'chunks', 'chunksBase64'].filter((k) => spec[k] !== undefined && spec[k] !== null)
  if (bodies.length > 1) throw new Error(`give one of body, bodyBase64, chunks, chunksBase64 (got ${bodies.join(', ')})`)
  const program = {
    status,
    headers,
    chunkDelayMs: Number(spec.chunkDelayMs) || 0,
    delayMs: Number(spec.delayMs) || 0
  }
  if (typeof spec.body === 'string') program.body = Buffer.from(spec.body, 'utf8')
  else if (typeof spec.bodyBase64 === 'string') program.body = Buffer.from(spec.bodyBase64, 'base64')
  else if (Array.isArray(spec.chunks)) program.chunks = spec.chunks.map((c) => Buffer.from(String(c), 'utf8'))
  else if (Array.isArray(spec.chunksBase64)) program.chunks = spec.chunksBase64.map((c) => Buffer.from(String(c), 'base64'))
  else if (bodies.length) throw new Error('body/bodyBase64 must be strings, chunks/chunksBase64 lists')
  return { route: spec.route, program }
}

function controlApp () {
  const app = express()
  app.use(express.json({ limit: '64mb' }))
  app.get('/received', (req, res) => res.json(state.received))
  app.post('/reset', (req, res) => {
    reset()
    res.json({ ok: true })
  })
  app.post('/answer', (req, res) => {
    let decoded
    try {
      decoded = decodeProgram(req.body)
    } catch (error) {
      res.status(400).json({ ok: false, message: error.message })
      return
    }
    state.answers[decoded.route] = decoded.program
    res.json({ ok: true })
  })
  app.use((req, res) => res.status(404).json({ ok: false, message: 'no such control call' }))
  app.use((err, req, res, next) => res.status(err.status || 500).json({ ok: false, message: String(err.message) }))
  return app
}

// ---------------------------------------------------------------- main

function listen (server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
}

async function main () {
  const options = parseArgs(process.argv.slice(2))
  const publicServer = http.createServer(publicApp())
  const controlServer = http.createServer(controlApp())
  await listen(publicServer, options.port)
  await listen(controlServer, options.controlPort)
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0))
  if (options.exitWithStdin) {
    // The test process holds our stdin: when it dies, even by SIGKILL, we go too.
    process.stdin.on('end', () => process.exit(0))
    process.stdin.on('error', () => process.exit(0))
    process.stdin.resume()
  }
  process.stdout.write('ready\n')
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : String(error))
  process.exit(1)
})
