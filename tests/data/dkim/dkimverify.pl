#!/usr/bin/perl
# Verify the DKIM signatures of the message on standard input with Mail::DKIM, the independent
# implementation the interop tests compare mxward with. Keys are asked only of the DNS server
# given with --dns 127.x.y.z:PORT (the tests' server on loopback), never of the system's.
#
# Output: one line per signature, "<result> <domain> <selector> <algorithm> <detail>", then
# "message <result>" (Mail::DKIM's words: pass, fail, invalid, temperror, none).
use strict;
use warnings;
use Getopt::Long;
use Mail::DKIM::DNS;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my $dns = '';
GetOptions('dns=s' => \$dns) or die "usage: dkimverify.pl --dns 127.0.0.1:PORT < message\n";
$dns =~ /\A(127\.\d{1,3}\.\d{1,3}\.\d{1,3}):(\d{1,5})\z/
  or die "--dns must name a loopback server as 127.x.y.z:PORT\n";
my $resolver = Net::DNS::Resolver->new(
    nameservers => [$1],
    port        => $2,
    searchlist  => [],
    recurse     => 1,
    retry       => 2,
    udp_timeout => 5,
    tcp_timeout => 5,
);
Mail::DKIM::DNS::resolver($resolver);

binmode STDIN;
binmode STDOUT;
my $dkim = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $signature ($dkim->signatures) {
    my $detail = $signature->result_detail // '';
    $detail =~ s/\s+/ /g;
    printf "%s %s %s %s %s\n", $signature->result // 'none', $signature->domain // '-',
      $signature->selector // '-', $signature->algorithm // '-', $detail;
}
print 'message ', $dkim->result, "\n";
