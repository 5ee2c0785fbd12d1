/*
 * A gateway's batch for `POST /telemetry` (edge_module/telemetry_endpoint.py), split in one pass over
 * its JSON text: each item's credential, message id, properties and the exact bytes of its body,
 * with the contract's fields of every body taken as a float64 table, as `_contract.fields_table`
 * takes them from parsed bodies.
 *
 * Why C: parsing a batch of 500 with orjson built 500 dicts of 25 numbers, which were read once
 * into the table and thrown away, and each body was serialised again (orjson.dumps) to be
 * forwarded. With the contract's checks that took 3.5 µs a message of the service's one busy
 * thread; this pass and the checks take 1.5 (docs/benchmarks.md).
 *
 * It accepts exactly the JSON orjson accepts (a test compares them): RFC 8259 in UTF-8, no byte
 * order mark, nesting at most MAX_DEPTH deep, and no number whose double is infinite. A batch
 * that is not JSON gives None (the caller refuses it as one message, as before).
 *
 * A row is plain, as in fields_table, when the body is an object holding every name (the last
 * of a repeated key counts, as orjson keeps it), the first name's value an integer literal and
 * every other a number literal. Numbers take the value float() gives: an integer literal is
 * rounded as float(int) rounds it (so -0 is 0.0), any other as Python reads a float literal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 1024 /* orjson's: an array or object nested deeper is refused */
#define MAX_NAMES 64
#define MAX_NAME_BYTES 160
#define KEY_BUFFER (6 * MAX_NAME_BYTES) /* a key longer escaped is none of the names */

typedef struct {
    const char *p, *end;
} Cursor;

typedef struct {
    Py_ssize_t k;
    const char *text[MAX_NAMES];
    Py_ssize_t size[MAX_NAMES];
} Names;

/* One body's fields as the scan goes: each name's last value, and whether it was a plain number. */
typedef struct {
    double *row;
    unsigned char seen[MAX_NAMES]; /* 0 absent, 1 plain, 2 present but not plain */
    Py_ssize_t next;               /* the name expected next: bodies list them in order */
} Fields;

static void skip_space(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

static int at_number(const Cursor *c) {
    return c->p < c->end && (*c->p == '-' || (*c->p >= '0' && *c->p <= '9'));
}

static int hex4(const char *p, unsigned *value) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        const char h = p[i];
        v <<= 4;
        if (h >= '0' && h <= '9')
            v |= (unsigned)(h - '0');
        else if (h >= 'a' && h <= 'f')
            v |= (unsigned)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F')
            v |= (unsigned)(h - 'A' + 10);
        else
            return 0;
    }
    *value = v;
    return 1;
}

/* Length of the valid UTF-8 sequence at p (a byte of 0x80 or more), 0 if it is not one. */
static int utf8_sequence(const unsigned char *p, const unsigned char *end) {
    const unsigned char b = p[0];
    int n;
    unsigned char low = 0x80, high = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
        n = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        n = 3;
        if (b == 0xE0) low = 0xA0;  /* overlong */
        if (b == 0xED) high = 0x9F; /* surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4;
        if (b == 0xF0) low = 0x90;  /* overlong */
        if (b == 0xF4) high = 0x8F; /* beyond U+10FFFF */
    } else
        return 0;
    if (end - p < n || p[1] < low || p[1] > high) return 0;
    for (int i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xBF) return 0;
    return n;
}

/* Scans the string at c->p (its opening quote): *start..*stop its text between the quotes,
 * *escaped whether it holds a backslash. 0 if it is not a valid JSON string. */
static int scan_string(Cursor *c, const char **start, const char **stop, int *escaped) {
    const char *p = c->p + 1;
    *start = p;
    *escaped = 0;
    while (p < c->end) {
        const unsigned char ch = (unsigned char)*p;
        if (ch == '"') {
            *stop = p;
            c->p = p + 1;
            return 1;
        }
        if (ch < 0x20) return 0;
        if (ch == '\\') {
            *escaped = 1;
            if (c->end - p < 2) return 0;
            const char e = p[1];
            if (e == 'u') {
                unsigned unit, low;
                if (c->end - p < 6 || !hex4(p + 2, &unit)) return 0;
                p += 6;
                if (unit >= 0xDC00 && unit <= 0xDFFF) return 0; /* a low surrogate first */
                if (unit >= 0xD800 && unit <= 0xDBFF) {         /* needs its low surrogate */
                    if (c->end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &low) ||
                        low < 0xDC00 || low > 0xDFFF)
                        return 0;
                    p += 6;
                }
            } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
                p += 2;
            } else
                return 0;
        } else if (ch < 0x80) {
            p++;
        } else {
            const int n = utf8_sequence((const unsigned char *)p, (const unsigned char *)c->end);
            if (n == 0) return 0;
            p += n;
        }
    }
    return 0;
}

static char *put_utf8(char *out, unsigned code) {
    if (code < 0x80) {
        *out++ = (char)code;
    } else if (code < 0x800) {
        *out++ = (char)(0xC0 | (code >> 6));
        *out++ = (char)(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
        *out++ = (char)(0xE0 | (code >> 12));
        *out++ = (char)(0x80 | ((code >> 6) & 0x3F));
        *out++ = (char)(0x80 | (code & 0x3F));
    } else {
        *out++ = (char)(0xF0 | (code >> 18));
        *out++ = (char)(0x80 | ((code >> 12) & 0x3F));
        *out++ = (char)(0x80 | ((code >> 6) & 0x3F));
        *out++ = (char)(0x80 | (code & 0x3F));
    }
    return out;
}

/* The UTF-8 text of a string scan_string accepted, escapes resolved, into `out` (at least
 * stop - start bytes: an escape never takes more room resolved); its length. */
static Py_ssize_t unescape(const char *p, const char *stop, char *out) {
    char *o = out;
    while (p < stop) {
        if (*p != '\\') {
            *o++ = *p++;
            continue;
        }
        const char e = p[1];
        if (e == 'u') {
            unsigned code = 0, low = 0; /* hex4 succeeds: scan_string checked the escape */
            hex4(p + 2, &code);
            p += 6;
            if (code >= 0xD800 && code <= 0xDBFF) {
                hex4(p + 2, &low);
                p += 6;
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
            }
            o = put_utf8(o, code);
            continue;
        }
        *o++ = e == 'b' ? '\b' : e == 'f' ? '\f' : e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e;
        p += 2;
    }
    return o - out;
}

/* A Python str of a string scan_string accepted; NULL with an error set. */
static PyObject *string_object(const char *start, const char *stop, int escaped) {
    if (!escaped) return PyUnicode_DecodeUTF8(start, stop - start, "strict");
    char *buffer = PyMem_Malloc((size_t)(stop - start) + 1);
    if (buffer == NULL) return PyErr_NoMemory();
    PyObject *text = PyUnicode_DecodeUTF8(buffer, unescape(start, stop, buffer), "strict");
    PyMem_Free(buffer);
    return text;
}

static const double EXACT_POWERS[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                      1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                      1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Scans the number at c->p: *value its double, *integer whether orjson reads it as an int (an
 * integer literal from -2**63 to 2**64 - 1; beyond, a float). 0 if it is not a JSON number or its
 * double is infinite (orjson refuses both); -1 on an error. */
static int scan_number(Cursor *c, double *value, int *integer) {
    const char *p = c->p, *start = p;
    int negative = 0, exact = 1, wide = 0;
    Py_ssize_t digits = 0, exponent = 0; /* a text's length bounds both */
    uint64_t mantissa = 0, whole = 0;
    if (*p == '-') {
        negative = 1;
        p++;
    }
    if (p >= c->end || *p < '0' || *p > '9') return 0;
    if (*p == '0') {
        p++;
        if (p < c->end && *p >= '0' && *p <= '9') return 0; /* a leading zero */
    } else {
        for (; p < c->end && *p >= '0' && *p <= '9'; p++, digits++) {
            const uint64_t digit = (uint64_t)(*p - '0');
            wide |= __builtin_mul_overflow(whole, 10, &whole) | __builtin_add_overflow(whole, digit, &whole);
            if (digits < 19)
                mantissa = mantissa * 10 + digit;
            else
                exact = 0;
        }
    }
    *integer = !wide && (!negative || whole <= (UINT64_C(1) << 63));
    if (p < c->end && *p == '.') {
        *integer = 0;
        p++;
        if (p >= c->end || *p < '0' || *p > '9') return 0;
        for (; p < c->end && *p >= '0' && *p <= '9'; p++) {
            if (mantissa == 0 && *p == '0') {
                exponent--;
                continue;
            }
            if (digits < 19) {
                mantissa = mantissa * 10 + (uint64_t)(*p - '0');
                exponent--;
                digits++;
            } else
                exact = 0;
        }
    }
    if (p < c->end && (*p == 'e' || *p == 'E')) {
        *integer = 0;
        p++;
        Py_ssize_t sign = 1, power = 0;
        if (p < c->end && (*p == '+' || *p == '-')) sign = *p++ == '-' ? -1 : 1;
        if (p >= c->end || *p < '0' || *p > '9') return 0;
        for (; p < c->end && *p >= '0' && *p <= '9'; p++) {
            if (power < 100000)
                power = power * 10 + (*p - '0');
            else
                exact = 0; /* a power this large is read from the text */
        }
        exponent += sign * power;
    }
    c->p = p;
    /* Exact in a double, and one correctly rounded operation: the result is correctly rounded. */
    if (exact && mantissa <= (UINT64_C(1) << 53) && exponent >= -22 && exponent <= 22) {
        const double m = (double)mantissa;
        *value = exponent < 0 ? m / EXACT_POWERS[-exponent] : m * EXACT_POWERS[exponent];
    } else {
        char small[64];
        const size_t size = (size_t)(p - start);
        char *text = size < sizeof small ? small : PyMem_Malloc(size + 1);
        if (text == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(text, start, size);
        text[size] = '\0';
        *value = PyOS_string_to_double(text, NULL, NULL); /* correctly rounded, as float() reads */
        if (text != small) PyMem_Free(text);
        if (*value == -1.0 && PyErr_Occurred()) return -1;
        if (Py_IS_INFINITY(*value)) return 0;
        return 1;
    }
    if (negative) *value = *integer && *value == 0.0 ? 0.0 : -*value;
    return 1;
}

static int skip_value(Cursor *c, int depth);

/* A key's index in names, or -1; keys of bodies come in the names' order, so the next is tried first. */
static Py_ssize_t name_index(const Names *names, Fields *fields, const char *key, Py_ssize_t size) {
    const Py_ssize_t k = names->k, guess = fields->next;
    for (Py_ssize_t i = 0; i < k; i++) {
        const Py_ssize_t j = (guess + i) % k;
        if (names->size[j] == size && memcmp(names->text[j], key, (size_t)size) == 0) {
            fields->next = j + 1;
            return j;
        }
    }
    return -1;
}

/* A key as its UTF-8 text: a pointer into the input, or into `buffer` when it holds escapes. */
static const char *key_text(const char *start, const char *stop, int escaped, char *buffer, Py_ssize_t size,
                            Py_ssize_t *length) {
    if (!escaped) {
        *length = stop - start;
        return start;
    }
    if (stop - start > size) { /* longer than any name: matches none */
        *length = -1;
        return start;
    }
    *length = unescape(start, stop, buffer);
    return buffer;
}

/* Opens the array or object at c->p (whose closing bracket is `close`): 1 if a member follows,
 * 0 if it is empty (and closed). */
static int open_container(Cursor *c, char close) {
    c->p++;
    skip_space(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    return 1;
}

/* After a member's value: 1 if another member follows, 0 if the container closed here, -1 if
 * the text is not JSON. */
static int next_member(Cursor *c, char close) {
    skip_space(c);
    if (c->p < c->end && *c->p == ',') {
        c->p++;
        skip_space(c);
        return 1;
    }
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    return -1;
}

/* An object member's key and its colon, c->p then at the value: 1, or 0 if not JSON. */
static int member_key(Cursor *c, const char **start, const char **stop, int *escaped) {
    if (c->p >= c->end || *c->p != '"' || !scan_string(c, start, stop, escaped)) return 0;
    skip_space(c);
    if (c->p >= c->end || *c->p != ':') return 0;
    c->p++;
    skip_space(c);
    return 1;
}

/* The value of an object's member whose key is `key` (`length` bytes, -1: none of the names):
 * a number under one of the names is taken into `fields`, anything else skipped (validated),
 * `depth` containers around it. 1, 0 not JSON, -1 error. */
static int take_member(Cursor *c, int depth, const Names *names, Fields *fields, const char *key,
                       Py_ssize_t length) {
    const Py_ssize_t j = length < 0 ? -1 : name_index(names, fields, key, length);
    if (j >= 0 && at_number(c)) {
        int integer;
        const int status = scan_number(c, &fields->row[j], &integer);
        fields->seen[j] = j == 0 && !integer ? 2 : 1;
        return status;
    }
    if (j >= 0) fields->seen[j] = 2;
    return skip_value(c, depth);
}

/* Skips (validating) the value at c->p, `depth` containers around it; when it is an object, takes
 * the values of `names` from it into `fields`. 1 valid, 0 not JSON, -1 error. */
static int scan_fields(Cursor *c, int depth, const Names *names, Fields *fields) {
    if (c->p >= c->end || *c->p != '{') return skip_value(c, depth);
    if (depth >= MAX_DEPTH) return 0;
    char buffer[KEY_BUFFER];
    int more = open_container(c, '}');
    while (more > 0) {
        const char *start, *stop;
        int escaped;
        if (!member_key(c, &start, &stop, &escaped)) return 0;
        Py_ssize_t length;
        const char *key = key_text(start, stop, escaped, buffer, (Py_ssize_t)sizeof buffer, &length);
        const int status = take_member(c, depth + 1, names, fields, key, length);
        if (status <= 0) return status;
        more = next_member(c, '}');
    }
    return more == 0;
}

static int skip_value(Cursor *c, int depth) {
    if (c->p >= c->end) return 0;
    const char ch = *c->p;
    if (ch == '"') {
        const char *start, *stop;
        int escaped;
        return scan_string(c, &start, &stop, &escaped);
    }
    if (at_number(c)) {
        double value;
        int integer;
        return scan_number(c, &value, &integer);
    }
    static const char *const literals[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        const size_t size = strlen(literals[i]);
        if ((size_t)(c->end - c->p) >= size && memcmp(c->p, literals[i], size) == 0) {
            c->p += size;
            return 1;
        }
    }
    if (ch != '[' && ch != '{') return 0;
    if (depth >= MAX_DEPTH) return 0;
    const char close = ch == '[' ? ']' : '}';
    int more = open_container(c, close);
    while (more > 0) {
        if (close == '}') {
            const char *start, *stop;
            int escaped;
            if (!member_key(c, &start, &stop, &escaped)) return 0;
        }
        const int status = skip_value(c, depth + 1);
        if (status <= 0) return status;
        more = next_member(c, close);
    }
    return more == 0;
}

/* Whether the JSON value at start..stop (scanned already) is falsy in Python once parsed:
 * null, false, 0, "", [] or {}; -1 on an error. */
static int falsy(const char *start, const char *stop) {
    if (*start == 'n' || *start == 'f') return 1;
    if (*start == 't') return 0;
    if (*start == '"') return stop - start == 2;
    if (*start == '[' || *start == '{') {
        Cursor inside = {.p = start + 1, .end = stop};
        skip_space(&inside);
        return inside.p == stop - 1;
    }
    Cursor number = {.p = start, .end = stop}; /* a number, scanned already */
    double value;
    int integer;
    const int status = scan_number(&number, &value, &integer);
    return status < 0 ? -1 : value == 0.0;
}

static PyObject *BatchRefused; /* the module's exception, made once at import */

typedef struct {
    PyObject *items;    /* list of (credential, body, properties JSON or None, message id) */
    double *table;      /* rows of k doubles */
    unsigned char *plain;
    Py_ssize_t count, capacity;
    PyObject *refusal;  /* the first item's reason to refuse the batch (str), or NULL */
} Batch;

static int grow(Batch *batch, Py_ssize_t k) {
    if (batch->count < batch->capacity) return 0;
    const Py_ssize_t capacity = batch->capacity ? batch->capacity * 2 : 512;
    double *table = PyMem_Realloc(batch->table, (size_t)capacity * (size_t)k * sizeof(double));
    if (table == NULL) goto fail;
    batch->table = table;
    unsigned char *plain = PyMem_Realloc(batch->plain, (size_t)capacity);
    if (plain == NULL) goto fail;
    batch->plain = plain;
    batch->capacity = capacity;
    return 0;
fail:
    PyErr_NoMemory();
    return -1;
}

/* An envelope's message id or credential into *out: a str, or None (absent or null). 1, 0 if it
 * is neither, -1 on an error. */
static int optional_string(const char *start, const char *stop, PyObject **out) {
    if (start == NULL || *start == 'n') {
        *out = Py_NewRef(Py_None);
        return 1;
    }
    if (*start != '"') return 0;
    const int escaped = memchr(start, '\\', (size_t)(stop - start)) != NULL;
    *out = string_object(start + 1, stop - 1, escaped);
    return *out == NULL ? -1 : 1;
}

static int refuse(Batch *batch, const char *format, Py_ssize_t index) {
    if (batch->refusal != NULL) return 0;
    batch->refusal = PyUnicode_FromFormat(format, index);
    return batch->refusal == NULL ? -1 : 0;
}

/* Scans item `index` of the batch (an object, c->p at it) and adds it. 1, 0 not JSON, -1 error. */
static int scan_item(Cursor *c, const Names *names, Batch *batch) {
    const Py_ssize_t index = batch->count, k = names->k;
    if (grow(batch, k) < 0) return -1;
    double body_row[MAX_NAMES];
    Fields own = {.row = batch->table + index * k}, body = {.row = body_row};
    const char *item_start = c->p;
    const char *spans[4][2] = {{NULL, NULL}}; /* body, properties, messageId, authorization */
    static const char *const envelope[4] = {"body", "properties", "messageId", "authorization"};
    char buffer[KEY_BUFFER];
    int more = open_container(c, '}');
    while (more > 0) {
        const char *start, *stop;
        int escaped, status;
        if (!member_key(c, &start, &stop, &escaped)) return 0;
        Py_ssize_t length;
        const char *key = key_text(start, stop, escaped, buffer, (Py_ssize_t)sizeof buffer, &length);
        int slot = -1;
        for (int s = 0; s < 4 && length >= 0; s++)
            if ((size_t)length == strlen(envelope[s]) && memcmp(key, envelope[s], (size_t)length) == 0)
                slot = s;
        const char *value = c->p;
        if (slot == 0) { /* the body: its fields, the last "body" counting */
            memset(body.seen, 0, sizeof body.seen);
            status = scan_fields(c, 2, names, &body);
        } else
            status = take_member(c, 2, names, &own, key, length);
        if (status <= 0) return status;
        if (slot >= 0) {
            spans[slot][0] = value;
            spans[slot][1] = c->p;
        }
        more = next_member(c, '}');
    }
    if (more < 0) return 0;
    const int enveloped = spans[0][0] != NULL;
    Fields *fields = enveloped ? &body : &own;
    int plain = !enveloped || *spans[0][0] == '{';
    for (Py_ssize_t j = 0; j < k && plain; j++) plain = fields->seen[j] == 1;
    if (plain && enveloped) memcpy(own.row, body_row, (size_t)k * sizeof(double));
    if (!plain) memset(own.row, 0, (size_t)k * sizeof(double));
    batch->plain[index] = (unsigned char)plain;

    const char *body_start = enveloped ? spans[0][0] : item_start;
    const char *body_stop = enveloped ? spans[0][1] : c->p;
    PyObject *properties = NULL, *message_id = NULL, *credential = NULL, *body_bytes = NULL;
    if (enveloped) { /* checked in this order, as the endpoint did before it split batches in C */
        const int empty = spans[1][0] == NULL ? 1 : falsy(spans[1][0], spans[1][1]);
        if (empty < 0) goto fail;
        if (!empty && *spans[1][0] != '{' && refuse(batch, "item %zd: properties must be a JSON object", index) < 0)
            goto fail;
        if (!empty && *spans[1][0] == '{' &&
            (properties = PyBytes_FromStringAndSize(spans[1][0], spans[1][1] - spans[1][0])) == NULL)
            goto fail;
        const int id = optional_string(spans[2][0], spans[2][1], &message_id);
        if (id < 0 || (id == 0 && refuse(batch, "item %zd: messageId must be a string", index) < 0)) goto fail;
        const int token = optional_string(spans[3][0], spans[3][1], &credential);
        if (token < 0 || (token == 0 && refuse(batch, "item %zd: authorization must be a string", index) < 0))
            goto fail;
    }
    body_bytes = PyBytes_FromStringAndSize(body_start, body_stop - body_start);
    if (body_bytes == NULL) goto fail;
    PyObject *item = PyTuple_Pack(4, credential ? credential : Py_None, body_bytes,
                                  properties ? properties : Py_None, message_id ? message_id : Py_None);
    if (item == NULL || PyList_Append(batch->items, item) < 0) {
        Py_XDECREF(item);
        goto fail;
    }
    Py_DECREF(item);
    Py_XDECREF(properties);
    Py_XDECREF(message_id);
    Py_XDECREF(credential);
    Py_DECREF(body_bytes);
    batch->count++;
    return 1;
fail:
    Py_XDECREF(properties);
    Py_XDECREF(message_id);
    Py_XDECREF(credential);
    Py_XDECREF(body_bytes);
    return -1;
}

/* Scans the whole batch (a JSON array): 1, 0 not JSON, -1 error. */
static int scan_batch(Cursor *c, const Names *names, Batch *batch) {
    skip_space(c);
    if (c->p >= c->end || *c->p != '[') return 0;
    int more = open_container(c, ']');
    while (more > 0) {
        int status;
        if (c->p < c->end && *c->p == '{') {
            status = scan_item(c, names, batch);
        } else {
            status = skip_value(c, 1);
            if (status > 0 &&
                refuse(batch, "a batch holds JSON objects (bodies or envelopes); item %zd is not one",
                       batch->count) < 0)
                return -1;
        }
        if (status <= 0) return status;
        more = next_member(c, ']');
    }
    if (more < 0) return 0;
    skip_space(c);
    return c->p == c->end;
}

static PyObject *split(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer text;
    PyObject *names_tuple;
    if (!PyArg_ParseTuple(args, "y*O!", &text, &PyTuple_Type, &names_tuple)) return NULL;
    Names names = {.k = PyTuple_GET_SIZE(names_tuple)};
    Batch batch = {0};
    PyObject *result = NULL;
    if (names.k < 1 || names.k > MAX_NAMES) {
        PyErr_Format(PyExc_ValueError, "names must hold 1 to %d names", MAX_NAMES);
        goto done;
    }
    for (Py_ssize_t j = 0; j < names.k; j++) {
        PyObject *name = PyTuple_GET_ITEM(names_tuple, j);
        if (!PyUnicode_Check(name)) {
            PyErr_Format(PyExc_TypeError, "names must be str, not %.80s", Py_TYPE(name)->tp_name);
            goto done;
        }
        names.text[j] = PyUnicode_AsUTF8AndSize(name, &names.size[j]);
        if (names.text[j] == NULL) goto done;
        if (names.size[j] > MAX_NAME_BYTES) {
            PyErr_Format(PyExc_ValueError, "a name is longer than %d bytes", MAX_NAME_BYTES);
            goto done;
        }
        for (Py_ssize_t i = 0; i < j; i++) {
            if (names.size[i] == names.size[j] && memcmp(names.text[i], names.text[j], (size_t)names.size[j]) == 0) {
                PyErr_Format(PyExc_ValueError, "names must be distinct: %R twice", name);
                goto done;
            }
        }
    }
    batch.items = PyList_New(0);
    if (batch.items == NULL) goto done;
    Cursor cursor = {.p = text.buf, .end = (const char *)text.buf + text.len};
    const int status = scan_batch(&cursor, &names, &batch);
    if (status < 0) goto done;
    if (status == 0) {
        result = Py_NewRef(Py_None);
    } else if (batch.refusal != NULL) {
        PyErr_SetObject(BatchRefused, batch.refusal);
    } else {
        PyObject *table = PyBytes_FromStringAndSize((const char *)batch.table,
                                                    batch.count * names.k * (Py_ssize_t)sizeof(double));
        PyObject *plain = PyBytes_FromStringAndSize((const char *)batch.plain, batch.count);
        if (table != NULL && plain != NULL) result = PyTuple_Pack(3, batch.items, table, plain);
        Py_XDECREF(table);
        Py_XDECREF(plain);
    }
done:
    Py_XDECREF(batch.items);
    Py_XDECREF(batch.refusal);
    PyMem_Free(batch.table);
    PyMem_Free(batch.plain);
    PyBuffer_Release(&text);
    return result;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS,
     "split(text, names) -> (items, table, plain) | None\n\n"
     "A gateway's batch (a JSON array of bodies or envelopes {body, properties, messageId, "
     "authorization}) in one pass. `items`: a (credential, body, properties, message id) tuple per "
     "item: the body's exact bytes (the item itself when it has no body), the properties' JSON text "
     "(None when absent or empty), credential and message id a str or None. `table`: float64 bytes, "
     "a row of len(names) per item, the body's fields named `names`; `plain`: a byte per item, 1 where "
     "its row is plain (see the module). None if `text` is not JSON; BatchRefused naming the first item "
     "that is not an object or whose properties, messageId or authorization has the wrong type."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_batch",
    .m_doc = "A gateway's batch for POST /telemetry, split in one pass over its JSON text.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__batch(void) {
    PyObject *self = PyModule_Create(&module);
    if (self == NULL) return NULL;
    BatchRefused = PyErr_NewExceptionWithDoc("edge_module._batch.BatchRefused",
                                             "A batch that is JSON but not a batch of messages: why.",
                                             PyExc_ValueError, NULL);
    if (BatchRefused == NULL || PyModule_AddObjectRef(self, "BatchRefused", BatchRefused) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}
