<?php
// Send a message to a user through the swocloud Route's HTTP API, from PHP
// with nothing but the standard library (php-cli).
//
//   php send.php http://127.0.0.1:9500 alice "hello" [api_key]
//
// Prints the Route's HTTP status and JSON answer, once the message is stored
// in the user's inbox: 200 {"uid","id","seq","status"}, status "delivered"
// when the user is online, "queued" when it will get it at its next connect;
// 503 when it could not be stored.
if ($argc < 4) {
    fwrite(STDERR, "usage: php send.php ROUTE_URL UID DATA [API_KEY]\n");
    exit(2);
}
[$_, $route, $uid, $data] = $argv;
$headers = ["Content-Type: application/json"];
if (isset($argv[4])) {
    $headers[] = "Authorization: Bearer " . $argv[4];
}
$context = stream_context_create(["http" => [
    "method" => "POST",
    "header" => implode("\r\n", $headers),
    "content" => json_encode(["uid" => $uid, "data" => $data]),
    "ignore_errors" => true,   // read the body of 404s too
    "timeout" => 5,
]]);
$body = file_get_contents(rtrim($route, "/") . "/api/send", false, $context);
if ($body === false) {
    fwrite(STDERR, "cannot reach $route\n");
    exit(1);
}
preg_match('#HTTP/\S+ (\d+)#', $http_response_header[0] ?? '', $m);
echo ($m[1] ?? '?') . " " . $body . "\n";
