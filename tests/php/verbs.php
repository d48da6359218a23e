<?php

declare(strict_types=1);

/*
 * The PHP client's verbs against a running cluster, for tests/php_client.rs:
 *
 *     php verbs.php ROUTE_URL SECRET STEP [ARGS…]
 *
 * Runs one step (the Rust test checks the cluster between steps) and prints
 * one JSON line per verb call: {"step","verb","ok":<answer>} or
 * {"step","verb","error":{"class","status","code","message"}}. Exits 0
 * unless the step itself could not run.
 */

require __DIR__ . '/../../clients/php/autoload.php';

use Swocloud\Client;
use Swocloud\Gateway;
use Swocloud\SwocloudException;
use Swocloud\Token;

if ($argc < 4) {
    fwrite(STDERR, "usage: php verbs.php ROUTE_URL SECRET STEP [ARGS…]\n");
    exit(2);
}
[, $url, $secret, $step] = $argv;
$args = array_slice($argv, 4);
$client = new Client($url);

/** Prints one verb's outcome as a JSON line. */
function report(string $step, string $verb, callable $call): void
{
    try {
        $line = ['step' => $step, 'verb' => $verb, 'ok' => $call()];
    } catch (SwocloudException $e) {
        $line = ['step' => $step, 'verb' => $verb, 'error' => [
            'class' => get_class($e),
            'status' => $e->getStatus(),
            'code' => $e->getErrorCode(),
            'message' => $e->getMessage(),
            'server_message' => $e instanceof \Swocloud\ApiException ? $e->getServerMessage() : null,
        ]];
    } catch (\InvalidArgumentException $e) {
        $line = ['step' => $step, 'verb' => $verb, 'error' => [
            'class' => get_class($e),
            'message' => $e->getMessage(),
        ]];
    }
    echo json_encode($line, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR), "\n";
}

switch ($step) {
    case 'token':
        // A user token minted here, used for /route as a browser would; one
        // expired past the Route's 30 s leeway.
        $token = Token::mint($secret, 'alice', 'user', 600);
        report($step, 'Token::mint', fn () => $token);
        report($step, 'routeFor', fn () => $client->routeFor('alice', $token));
        report($step, 'routeFor.foreign', fn () => $client->routeFor('bob', $token));
        report($step, 'routeFor.wrong_secret', fn () => $client->routeFor('alice', Token::user('not-the-secret', 'alice')));
        report($step, 'routeFor.expired', fn () => $client->routeFor('alice', Token::mint($secret, 'alice', 'user', -60)));
        break;

    case 'send':
        $data = ['n' => 1, 'text' => 'héllo/“php”', 'list' => [1, 2.5, null, true], 'empty' => new stdClass()];
        report($step, 'sendToUid', fn () => $client->sendToUid('alice', $data, 'php', 'r1'));
        report($step, 'sendToUid.retry', fn () => $client->sendToUid('alice', $data, 'php', 'r1'));
        report($step, 'sendToUid.many', fn () => $client->sendToUid(['bob', 'carol'], 'to both'));
        report($step, 'sendToUid.offline', fn () => $client->sendToUid('dave', 'for later'));
        report($step, 'sendToUid.bad_uid', fn () => $client->sendToUid('bad uid!', 1));
        report($step, 'isUidOnline', fn () => $client->isUidOnline('alice'));
        report($step, 'isUidOnline.offline', fn () => $client->isUidOnline('dave'));
        report($step, 'getOnline', fn () => $client->getOnline('alice'));
        break;

    case 'join':
        foreach (['alice', 'bob', 'dave'] as $uid) {
            report($step, "joinGroup.$uid", fn () => $client->joinGroup($uid, 'room:1'));
        }
        report($step, 'joinGroup.again', fn () => $client->joinGroup('alice', 'room:1'));
        report($step, 'joinGroup.bad_name', fn () => $client->joinGroup('alice', 'bad name'));
        report($step, 'joinGroup.long_name', fn () => $client->joinGroup('alice', str_repeat('g', 65)));
        report($step, 'joinGroup.longest_name', fn () => $client->joinGroup('carol', str_repeat('g', 64)));
        // Groups per user (the Route has group_max_per_user = 3).
        foreach (['g1', 'g2', 'g3', 'g4'] as $g) {
            report($step, "joinGroup.greedy.$g", fn () => $client->joinGroup('greedy', $g));
        }
        // Members per group (group_max_members = 260), and pages to follow.
        $n = (int) ($args[0] ?? 260);
        report($step, 'joinGroup.bulk', function () use ($client, $n) {
            $last = null;
            for ($i = 0; $i < $n; $i++) {
                $last = $client->joinGroup("p$i", 'big.group');
            }
            return $last;
        });
        report($step, 'joinGroup.full', fn () => $client->joinGroup("p$n", 'big.group'));
        break;

    case 'query':
        report($step, 'getClientCountByGroup', fn () => $client->getClientCountByGroup('room:1'));
        report($step, 'getUidListByGroup', fn () => $client->getUidListByGroup('room:1'));
        report($step, 'getUidListByGroup.big', fn () => $client->getUidListByGroup('big.group'));
        report($step, 'getGroupMembers.big', fn () => $client->getGroupMembers('big.group'));
        report($step, 'getClientCountByGroup.none', fn () => $client->getClientCountByGroup('nobody.here'));
        report($step, 'getUidListByGroup.none', fn () => $client->getUidListByGroup('nobody.here'));
        report($step, 'getUidListByGroup.bad_name', fn () => $client->getUidListByGroup('a/b'));
        break;

    case 'gsend':
        report($step, 'sendToGroup', fn () => $client->sendToGroup('room:1', ['g' => 1], 'php'));
        report($step, 'sendToGroup.empty', fn () => $client->sendToGroup('empty.group', 1));
        report($step, 'sendToGroup.bad_name', fn () => $client->sendToGroup('x{y}', 1));
        break;

    case 'leave':
        report($step, 'leaveGroup', fn () => $client->leaveGroup('bob', 'room:1'));
        report($step, 'leaveGroup.again', fn () => $client->leaveGroup('bob', 'room:1'));
        report($step, 'sendToGroup.after_leave', fn () => $client->sendToGroup('room:1', ['g' => 2], 'php'));
        break;

    case 'kick':
        report($step, 'closeUid', fn () => $client->closeUid('bob', 'bye from php'));
        report($step, 'closeUid.default', fn () => $client->closeUid('carol'));
        break;

    case 'auth':
        // ARGS: a Route with api_key, and the key.
        [$keyedUrl, $key] = $args;
        $bare = new Client($keyedUrl);
        report($step, 'isUidOnline.no_key', fn () => $bare->isUidOnline('alice'));
        report($step, 'sendToUid.no_key', fn () => $bare->sendToUid('alice', 'never'));
        report($step, 'isUidOnline.wrong_key', fn () => (new Client($keyedUrl, 'wrong'))->isUidOnline('alice'));
        // GatewayClient's static style.
        Gateway::$routeUrl = $keyedUrl;
        Gateway::$apiKey = $key;
        report($step, 'Gateway::isUidOnline', fn () => Gateway::isUidOnline('alice'));
        report($step, 'Gateway::getUidListByGroup', fn () => Gateway::getUidListByGroup('room:1'));
        Gateway::$apiKey = null;
        report($step, 'Gateway::isUidOnline.no_key', fn () => Gateway::isUidOnline('alice'));
        break;

    case 'network':
        // ARGS: a URL where nothing listens, one that never answers.
        $dead = new Client($args[0], null, 2.0);
        report($step, 'isUidOnline.dead', fn () => $dead->isUidOnline('alice'));
        report($step, 'sendToUid.dead', fn () => $dead->sendToUid('alice', 1));
        $silent = new Client($args[1], null, 0.5);
        report($step, 'isUidOnline.silent', function () use ($silent) {
            $t0 = microtime(true);
            try {
                return $silent->isUidOnline('alice');
            } finally {
                fwrite(STDOUT, json_encode(['step' => 'network', 'verb' => 'silent.seconds', 'ok' => microtime(true) - $t0]) . "\n");
            }
        });
        report($step, 'new Client.bad_url', fn () => new Client('ftp://example.com/'));
        break;

    default:
        fwrite(STDERR, "unknown step $step\n");
        exit(2);
}
